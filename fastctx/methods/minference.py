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

from fastctx.kernels.attention import Read
from fastctx.kernels.estimation import last_query_sums, pool_blocks, pooled_keys
from fastctx.kernels.paged import SeqKV, as_seq
from fastctx.kernels.sparse import (
    DEFAULT_BLOCK_Q,
    SparseIndex,
    block_mask_index,
    concat_heads,
    streaming_index,
    vertical_slash_index,
)
from fastctx.methods.base import Method, PrefillChunk, knob, register, require

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
    pattern_config: str | None = knob(
        None, "MInference per-head pattern JSON (a published file or one from `fastctx minference search`); "
        "null: every head vertical-slash with the budgets below. Checked against the model's layer/head counts")
    last_q: int = knob(LAST_Q, "queries used to estimate the index")
    v_size: int = knob(DEFAULT_PATTERN[1], "vertical (column) budget of heads the pattern file does not name "
                       "(MInference's 1000 is sized for 128K contexts: dense on an 8K model)")
    s_size: int = knob(DEFAULT_PATTERN[2], "slash (diagonal) budget of heads the pattern file does not name "
                       "(MInference's default 6096)")
    block_size: int = knob(DEFAULT_BLOCK_Q, "query rows per index block, 16/32/64/128 (MInference's 64); each "
                           "slash line costs about this many keys per query, so 32 makes slash-heavy heads cheaper")

    def __post_init__(self):
        require(self.block_size in (16, 32, 64, 128),
                f"block_size={self.block_size!r} must be 16, 32, 64 or 128 "
                "(MInference uses 64; 32 halves the cost of each slash line)")
        require(isinstance(self.last_q, int) and self.last_q >= 1,
                f"last_q={self.last_q!r} must be >= 1 (MInference uses 64)")
        require(isinstance(self.v_size, int) and isinstance(self.s_size, int) and self.v_size >= 1 and self.s_size >= 1,
                f"v_size/s_size must be >= 1, got {self.v_size!r}/{self.s_size!r} (MInference's default is 1000/6096)")
        require(self.pattern_config is None or Path(self.pattern_config).is_file(),
                f"pattern_config={self.pattern_config!r} is not a file; create one with "
                "`fastctx minference search` or drop the key")

    def layer_patterns(self, num_layers: int, num_heads: int) -> list[list[HeadPattern]]:
        if self.pattern_config is None:
            return [[HeadPattern("vertical_and_slash", self.v_size, self.s_size)] * num_heads] * num_layers
        return load_pattern_config(self.pattern_config, num_layers, num_heads,
                                   default=HeadPattern("vertical_and_slash", self.v_size, self.s_size))


@dataclass(frozen=True)
class HeadPattern:
    kind: str  # one of PATTERNS
    v: int  # vertical budget, block top-k, or A-shape sink
    s: int  # slash budget or A-shape local window


def vertical_slash(q, k: torch.Tensor | SeqKV, v_size, s_size, *, prefix: int = 0, last_q: int = LAST_Q,
                   scale: float | None = None, kv_head_of: torch.Tensor | None = None):
    """Key columns ``[H, NV]`` and diagonal offsets ``[H, NS]`` for vertical-slash heads.

    ``v_size``/``s_size`` are ints or per-head ``[H]`` budgets; ``kv_head_of`` maps each query head
    to its KV head when ``q`` holds a subset of a layer's heads.
    """
    heads = q.shape[0]
    seq = as_seq(k)
    tk = seq.length
    vertical, slash = last_query_sums(q, seq, prefix, last_q, scale, kv_head_of)
    vertical[:, :SINK_COLUMNS] = float("inf")
    slash[:, :LOCAL_DIAGONALS] = float("inf")
    v_size = torch.as_tensor(v_size).expand(heads).clamp(min=MIN_VERTICAL).clamp(max=tk)
    s_size = torch.as_tensor(s_size).expand(heads).clamp(min=MIN_SLASH).clamp(max=tk)
    v_idx = vertical.topk(int(v_size.max()), -1).indices
    s_idx = slash.topk(int(s_size.max()), -1).indices
    # Heads with smaller budgets repeat their first pick (column 0 / the main
    # diagonal, both always kept) in the unused slots.
    v_idx = torch.where((torch.arange(v_idx.shape[1]) < v_size[:, None]).to(v_idx.device), v_idx, 0)
    s_idx = torch.where((torch.arange(s_idx.shape[1]) < s_size[:, None]).to(s_idx.device), s_idx, 0)
    return v_idx, s_idx


def block_sparse_mask(q, k: torch.Tensor | SeqKV, topk: int = BLOCK_SPARSE_TOPK, *, prefix: int = 0,
                      block: int = BLOCK, kv_head_of: torch.Tensor | None = None) -> torch.Tensor:
    """``[H, R, NKB]`` bool: each query block's top-k key blocks by mean-pooled Q.K (plus its diagonal)."""
    heads, q_len, _ = q.shape
    seq = as_seq(k)
    nqb, nkb = -(-q_len // block), -(-seq.length // block)
    if kv_head_of is None:
        kv_head_of = torch.arange(heads) // (heads // seq.kv_heads)
    qp, kp = pool_blocks(q.float(), block), pooled_keys(seq, block)[kv_head_of.long()]
    scores = torch.einsum("hrd,hbd->hrb", qp, kp)
    first = prefix + torch.arange(nqb) * block
    last = torch.clamp(first + block - 1, max=prefix + q_len - 1)
    visible = torch.arange(nkb)[None] * block <= last[:, None]  # [R, NKB]
    scores = scores.masked_fill(~visible, float("-inf"))
    picked = scores.topk(min(topk, nkb), -1).indices
    mask = torch.zeros(heads, nqb, nkb, dtype=torch.bool).scatter_(-1, picked, True) & visible
    diagonal = (torch.arange(nkb)[None] >= (first // block)[:, None]) & visible
    return mask | diagonal


def head_index(pattern: HeadPattern, q, k: torch.Tensor | SeqKV, *, prefix: int = 0, last_q: int = LAST_Q,
               block_q: int = DEFAULT_BLOCK_Q, kv_head_of: torch.Tensor | None = None) -> SparseIndex:
    """The sparse index of one or more heads that share ``pattern``."""
    q_len = q.shape[1]
    if pattern.kind == "vertical_and_slash":
        v_idx, s_idx = vertical_slash(q, k, pattern.v, pattern.s, prefix=prefix, last_q=last_q, kv_head_of=kv_head_of)
        return vertical_slash_index(v_idx, s_idx, q_len, prefix, block_q)
    if pattern.kind == "block_sparse":
        mask = block_sparse_mask(q, k, pattern.v, prefix=prefix, kv_head_of=kv_head_of)
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


def layer_index(patterns: list[HeadPattern], q, k: torch.Tensor | SeqKV, *, prefix: int = 0,
                last_q: int = LAST_Q, block_q: int = DEFAULT_BLOCK_Q) -> SparseIndex:
    """The index of every head of a layer, each head with its own pattern and budgets."""
    heads = q.shape[0]
    if len(patterns) != heads:
        raise ValueError(f"{len(patterns)} head patterns for {heads} heads")
    seq = as_seq(k)
    vs = [h for h, p in enumerate(patterns) if p.kind == "vertical_and_slash"]
    budgets = (torch.tensor([patterns[h].v for h in vs]), torch.tensor([patterns[h].s for h in vs]))
    if len(vs) == heads:  # the common case: one estimation for the whole layer
        v_idx, s_idx = vertical_slash(q, seq, *budgets, prefix=prefix, last_q=last_q)
        return vertical_slash_index(v_idx, s_idx, q.shape[1], prefix, block_q)
    kv_head_of = torch.arange(heads) // (heads // seq.kv_heads)
    parts: dict[int, SparseIndex] = {}
    if vs:
        v_idx, s_idx = vertical_slash(q[vs], seq, *budgets, prefix=prefix, last_q=last_q, kv_head_of=kv_head_of[vs])
        index = vertical_slash_index(v_idx, s_idx, q.shape[1], prefix, block_q)
        parts.update({h: _head(index, i) for i, h in enumerate(vs)})
    for h, p in enumerate(patterns):
        if h not in parts:
            parts[h] = head_index(p, q[h:h + 1], seq, prefix=prefix, last_q=last_q, block_q=block_q,
                                  kv_head_of=kv_head_of[h:h + 1])
    return concat_heads([parts[h] for h in range(heads)])


def _head(index: SparseIndex, h: int) -> SparseIndex:
    return SparseIndex(index.ranges[h:h + 1], index.cols[h:h + 1], index.q_len, index.prefix, index.block_q)


@register
class MInference(Method):
    name = "minference"
    summary = "per-head vertical-slash / block-sparse / A-shape prefill, index estimated per chunk (MInference)"
    phases = ("prefill",)
    Params = MInferenceParams
    # Budgets for an 8K-context model: MInference's own (1000, 6096) would be dense here.
    eval_section = {"attention": "minference", "minference": {"v_size": 256, "s_size": 512}}

    def __init__(self, params: MInferenceParams, shape):
        super().__init__(params, shape)
        self.patterns = params.layer_patterns(shape.num_layers, shape.num_heads)

    def prefill(self, chunk: PrefillChunk) -> Read:
        return Read.indexed(layer_index(self.patterns[chunk.layer], chunk.q, chunk.keys, prefix=chunk.prefix,
                                        last_q=self.params.last_q, block_q=self.params.block_size))
