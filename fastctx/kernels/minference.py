"""MInference (Jiang et al., NeurIPS'24): per-head sparse prefill patterns.

- vertical-slash heads: from the last ``last_q`` queries, the key columns and
  diagonals that collect the most attention; the first 30 columns (sinks) and
  the 100 nearest diagonals (local window) are always kept;
- block-sparse heads: top-k 64x64 blocks by mean-pooled Q.K;
- A-shape heads: static sinks + local window (StreamingLLM).

Estimation works on a prefill *chunk*: its queries are the chunk's, its keys
are every key so far (cached prefix + chunk), so chunked prefill and prefix
caching need no special case. The per-head pattern file is MInference's own
JSON format: a list over layers of ``{head: [pattern, v, s, score]}``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from fastctx.kernels.dense import _check
from fastctx.kernels.sparse import (
    DEFAULT_BLOCK_Q,
    SparseIndex,
    block_mask_index,
    streaming_index,
    vertical_slash_index,
)

LAST_Q = 64
SINK_COLUMNS = 30
LOCAL_DIAGONALS = 100
MIN_VERTICAL, MIN_SLASH = 30, 50
DEFAULT_PATTERN = ("vertical_and_slash", 1000, 6096)
PATTERNS = ("vertical_and_slash", "block_sparse", "stream_llm")
BLOCK_SPARSE_TOPK = 100
BLOCK = 64


@dataclass(frozen=True)
class MInferenceParams:
    pattern_config: str | None = None  # MInference per-head JSON; None = every head vertical-slash
    last_q: int = LAST_Q
    v_size: int = DEFAULT_PATTERN[1]  # budgets of heads the config does not name
    s_size: int = DEFAULT_PATTERN[2]
    block_size: int = DEFAULT_BLOCK_Q  # query rows per index block of vertical-slash and A-shape heads

    def __post_init__(self):
        if self.block_size not in (16, 32, 64, 128):
            raise ValueError(f"minference block_size={self.block_size} must be 16, 32, 64 or 128 "
                             "(MInference uses 64; 32 halves the cost of each slash line)")
        if self.last_q < 1:
            raise ValueError(f"minference last_q={self.last_q} must be >= 1 (MInference uses 64)")
        if self.v_size < 1 or self.s_size < 1:
            raise ValueError(f"minference v_size/s_size must be >= 1, got {self.v_size}/{self.s_size} "
                             "(MInference's default is 1000/6096)")
        if self.pattern_config is not None and not Path(self.pattern_config).is_file():
            raise ValueError(f"minference pattern_config {self.pattern_config!r} is not a file; "
                             "create one with `fastctx minference search` or drop the key")

    def layer_patterns(self, num_layers: int, num_heads: int) -> list[list["HeadPattern"]]:
        if self.pattern_config is None:
            return [[HeadPattern("vertical_and_slash", self.v_size, self.s_size)] * num_heads] * num_layers
        return load_pattern_config(self.pattern_config, num_layers, num_heads,
                                   default=HeadPattern("vertical_and_slash", self.v_size, self.s_size))


@dataclass(frozen=True)
class HeadPattern:
    kind: str  # one of PATTERNS
    v: int  # vertical budget, block top-k, or A-shape sink
    s: int  # slash budget or A-shape local window


def _scores_last_queries(q, k, prefix, last_q, scale):
    """Softmax of the last ``last_q`` chunk queries over all keys, ``[H, n, Tk]`` fp32, and their positions."""
    heads, q_len, dim = q.shape
    n = min(last_q, q_len)
    group = heads // k.shape[0]
    scale = dim ** -0.5 if scale is None else scale
    pos = prefix + q_len - n + torch.arange(n)
    # Grouped so that each KV head's keys are read once, never copied per query head.
    q_grouped = (q[:, -n:].float() * scale).reshape(k.shape[0], group * n, dim)
    scores = torch.bmm(q_grouped, k.float().transpose(1, 2)).view(heads, n, -1)
    scores = scores.masked_fill(torch.arange(k.shape[1])[None, None] > pos[None, :, None], float("-inf"))
    return torch.softmax(scores, -1), pos


def diagonal_sums(probs: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """``[H, Tk]``: attention mass on each diagonal offset (query position - key position).

    ``probs`` are the last queries of a chunk (consecutive positions ending at
    key ``Tk - 1``), with zero mass on masked keys.
    """
    heads, n, tk = probs.shape
    if int(pos[-1]) != tk - 1 or n > 1 and not bool((pos.diff() == 1).all()):
        raise ValueError("diagonal_sums expects consecutive query positions ending at the last key")
    # Row i's key d - (n - 1 - i) lies on the diagonal of the last row's key d:
    # after n zeros of left padding it sits at column d + i + 1, so one strided
    # view lines every row up; the sums come out indexed by d = Tk - 1 - offset.
    padded = torch.nn.functional.pad(probs, (n, 0)).contiguous()  # [H, n, Tk + n]
    skewed = padded.as_strided((heads, n, tk), (n * (tk + n), tk + n + 1, 1), 1)
    return skewed.sum(1).flip(-1)


def reference_last_query_sums(q, k, prefix: int, last_q: int, scale: float | None = None):
    """``(vertical [H, Tk], slash [H, Tk])``: the attention mass of the chunk's last ``last_q``
    queries on each key column and on each diagonal offset, summed over those queries."""
    probs, pos = _scores_last_queries(q, k, prefix, last_q, scale)
    return probs.sum(1), diagonal_sums(probs, pos)


def check_chunk_keys(q, k, prefix: int) -> None:
    """The fused sums read raw memory: shapes must fit, and the keys end at the chunk's last query."""
    _check(q, k, k)
    if k.shape[1] != prefix + q.shape[1]:
        raise ValueError(f"the chunk's keys must end at its last query: {k.shape[1]} keys for "
                         f"prefix {prefix} + {q.shape[1]} queries")


def last_query_sums(q, k, prefix: int, last_q: int, scale: float | None = None):
    """``reference_last_query_sums`` without the ``[H, last_q, Tk]`` probabilities: fused in C++
    on CPU, in Triton on CUDA (power-of-two head_dim)."""
    check_chunk_keys(q, k, prefix)
    if q.is_cuda:
        from fastctx.kernels.sparse_triton import last_query_sums_triton, triton_head_dim

        if triton_head_dim(q.shape[-1]):
            return last_query_sums_triton(q, k, prefix, last_q, scale)
    if q.device.type != "cpu":
        return reference_last_query_sums(q, k, prefix, last_q, scale)
    from fastctx.kernels._cpu_ext import cpu_ops

    n = min(last_q, q.shape[1])
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return cpu_ops().last_query_sums(q[:, -n:].float().contiguous(), k.float().contiguous(), scale)


def vertical_slash(q, k, v_size, s_size, *, prefix: int = 0, last_q: int = LAST_Q,
                   scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Key columns ``[H, NV]`` and diagonal offsets ``[H, NS]`` for vertical-slash heads.

    ``v_size``/``s_size`` are ints or per-head ``[H]`` budgets.
    """
    heads = q.shape[0]
    tk = k.shape[1]
    vertical, slash = last_query_sums(q, k, prefix, last_q, scale)
    vertical[:, :SINK_COLUMNS] = float("inf")
    slash[:, :LOCAL_DIAGONALS] = float("inf")
    v_size = torch.as_tensor(v_size).expand(heads).clamp(min=MIN_VERTICAL).clamp(max=tk)
    s_size = torch.as_tensor(s_size).expand(heads).clamp(min=MIN_SLASH).clamp(max=tk)
    v_idx = vertical.topk(int(v_size.max()), -1).indices
    s_idx = slash.topk(int(s_size.max()), -1).indices
    # Heads with smaller budgets repeat their first pick (column 0 / the main
    # diagonal, both always kept) in the unused slots.
    v_idx = torch.where(torch.arange(v_idx.shape[1]) < v_size[:, None], v_idx, 0)
    s_idx = torch.where(torch.arange(s_idx.shape[1]) < s_size[:, None], s_idx, 0)
    return v_idx, s_idx


def pool_blocks(x: torch.Tensor, block: int, op: str = "mean") -> torch.Tensor:
    """Sum or mean over consecutive blocks of the token axis: ``[..., T, C]`` -> ``[..., ceil(T/block), C]``.

    The last, partial block is averaged over its real tokens only.
    """
    t = x.shape[-2]
    n = -(-t // block)
    summed = torch.nn.functional.pad(x, (0, 0, 0, n * block - t)).unflatten(-2, (n, block)).sum(-2)
    if op == "sum":
        return summed
    counts = torch.clamp(t - torch.arange(n) * block, max=block).to(x.dtype)
    return summed / counts[:, None]


def block_sparse_mask(q, k, topk: int = BLOCK_SPARSE_TOPK, *, prefix: int = 0, block: int = BLOCK) -> torch.Tensor:
    """``[H, R, NKB]`` bool: each query block's top-k key blocks by mean-pooled Q.K (plus its diagonal)."""
    heads, q_len, _ = q.shape
    nqb, nkb = -(-q_len // block), -(-k.shape[1] // block)
    group = heads // k.shape[0]
    qp, kp = pool_blocks(q.float(), block), pool_blocks(k.float(), block)
    scores = torch.einsum("hrd,hbd->hrb", qp, kp.repeat_interleave(group, 0))
    first = prefix + torch.arange(nqb) * block
    last = torch.clamp(first + block - 1, max=prefix + q_len - 1)
    visible = torch.arange(nkb)[None] * block <= last[:, None]  # [R, NKB]
    scores = scores.masked_fill(~visible, float("-inf"))
    picked = scores.topk(min(topk, nkb), -1).indices
    mask = torch.zeros(heads, nqb, nkb, dtype=torch.bool).scatter_(-1, picked, True) & visible
    diagonal = (torch.arange(nkb)[None] >= (first // block)[:, None]) & visible
    return mask | diagonal


def head_index(pattern: HeadPattern, q, k, *, prefix: int = 0, last_q: int = LAST_Q,
               block_q: int = DEFAULT_BLOCK_Q) -> SparseIndex:
    """The sparse index of one or more heads that share ``pattern``."""
    q_len = q.shape[1]
    if pattern.kind == "vertical_and_slash":
        v_idx, s_idx = vertical_slash(q, k, pattern.v, pattern.s, prefix=prefix, last_q=last_q)
        return vertical_slash_index(v_idx, s_idx, q_len, prefix, block_q)
    if pattern.kind == "block_sparse":
        mask = block_sparse_mask(q, k, pattern.v, prefix=prefix)
        if block_q != BLOCK:  # re-express the 64-row query blocks in rows of block_q (<= 128)
            starts = torch.arange(0, q_len, block_q)
            first, last = starts // BLOCK, torch.clamp(starts + block_q - 1, max=q_len - 1) // BLOCK
            mask = mask[:, first] | mask[:, last]
        return block_mask_index(mask, BLOCK, q_len, prefix, block_q)
    if pattern.kind == "stream_llm":
        return streaming_index(q.shape[0], q_len, sink=pattern.v, local=pattern.s, prefix=prefix, block_q=block_q)
    raise ValueError(f"unknown MInference pattern {pattern.kind!r}; expected one of {PATTERNS}")


def load_pattern_config(path: str | Path, num_layers: int, num_heads: int,
                        default: HeadPattern | None = None) -> list[list[HeadPattern]]:
    """MInference's per-head pattern JSON, checked against the model's layer and head counts.

    Heads missing from a layer get ``default``, by default MInference's
    ``(vertical_and_slash, 1000, 6096)``.
    """
    default = default or HeadPattern(*DEFAULT_PATTERN)
    path = Path(path)
    try:
        layers = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"MInference pattern file {path}: cannot read it as JSON ({exc})") from None
    if not isinstance(layers, list) or len(layers) != num_layers:
        found = len(layers) if isinstance(layers, list) else type(layers).__name__
        raise ValueError(f"MInference pattern file {path} describes {found} layers, but the model has "
                         f"{num_layers}; search a config for this model (fastctx minference search)")
    out = []
    for i, layer in enumerate(layers):
        heads = {int(h): entry for h, entry in layer.items()}
        if heads and max(heads) >= num_heads:
            raise ValueError(f"MInference pattern file {path}: layer {i} names head {max(heads)}, but the "
                             f"model has {num_heads} attention heads per layer")
        row = []
        for h in range(num_heads):
            kind, v, s = heads.get(h, (default.kind, default.v, default.s))[:3]
            if kind not in PATTERNS:
                raise ValueError(f"MInference pattern file {path}: layer {i} head {h} has pattern "
                                 f"{kind!r}; expected one of {PATTERNS}")
            row.append(HeadPattern(kind, int(v), int(s)))
        out.append(row)
    return out


def layer_index(patterns: list[HeadPattern], q, k, *, prefix: int = 0, last_q: int = LAST_Q,
                block_q: int = DEFAULT_BLOCK_Q) -> SparseIndex:
    """The index of every head of a layer, each head with its own pattern and budgets."""
    from fastctx.kernels.sparse import concat_heads

    heads = q.shape[0]
    if len(patterns) != heads:
        raise ValueError(f"{len(patterns)} head patterns for {heads} heads")
    vs = [h for h, p in enumerate(patterns) if p.kind == "vertical_and_slash"]
    budgets = (torch.tensor([patterns[h].v for h in vs]), torch.tensor([patterns[h].s for h in vs]))
    if len(vs) == heads:  # the common case: no per-head copies of the keys
        v_idx, s_idx = vertical_slash(q, k, *budgets, prefix=prefix, last_q=last_q)
        return vertical_slash_index(v_idx, s_idx, q.shape[1], prefix, block_q)
    k_per_head = k.repeat_interleave(heads // k.shape[0], 0)
    parts: dict[int, SparseIndex] = {}
    if vs:
        v_idx, s_idx = vertical_slash(q[vs], k_per_head[vs], *budgets, prefix=prefix, last_q=last_q)
        index = vertical_slash_index(v_idx, s_idx, q.shape[1], prefix, block_q)
        parts.update({h: _head(index, i) for i, h in enumerate(vs)})
    for h, p in enumerate(patterns):
        if h not in parts:
            parts[h] = head_index(p, q[h:h + 1], k_per_head[h:h + 1], prefix=prefix, last_q=last_q,
                                  block_q=block_q)
    return concat_heads([parts[h] for h in range(heads)])


def _head(index: SparseIndex, h: int) -> SparseIndex:
    return SparseIndex(index.ranges[h:h + 1], index.cols[h:h + 1], index.q_len, index.prefix, index.block_q)
