"""What sparse methods estimate their indexes from, shared by every method.

- ``last_query_sums``: the attention mass of a chunk's last queries on each key
  column and on each diagonal offset (MInference's vertical-slash estimate,
  FlexPrefill's pattern choice), without the ``[H, last_q, Tk]`` probabilities;
- ``diagonal_sums``: the same mass per diagonal, from stored probabilities;
- ``pool_blocks`` / ``pooled_keys``: block-mean pooling of queries and keys.

Keys come as one sequence's ``[kv_heads, tokens, head_dim]`` tensor or as a
``SeqKV`` read through a paged cache. Each op has a plain PyTorch reference; the
fast paths are the C++ kernels on CPU and Triton on CUDA.
"""

from __future__ import annotations

import torch

from fastctx.kernels.dense import _check
from fastctx.kernels.paged import SeqKV, as_seq


def _kv_head_of(heads: int, kv_heads: int, kv_head_of: torch.Tensor | None) -> torch.Tensor:
    if kv_head_of is None:
        return torch.arange(heads) // (heads // kv_heads)
    if kv_head_of.shape != (heads,):
        raise ValueError(f"kv_head_of must name one KV head per query head ({heads}), got {tuple(kv_head_of.shape)}")
    return kv_head_of.long().cpu()


def check_chunk_keys(q: torch.Tensor, seq: SeqKV, prefix: int, kv_head_of: torch.Tensor | None = None) -> None:
    """The fused sums read raw memory: shapes must fit, and the keys end at the chunk's last query."""
    if q.dim() != 3 or q.shape[-1] != seq.head_dim:
        raise ValueError(f"q must be [heads, tokens, {seq.head_dim}], got {tuple(q.shape)}")
    if kv_head_of is None and q.shape[0] % seq.kv_heads:
        raise ValueError(f"{q.shape[0]} query heads are not a multiple of {seq.kv_heads} KV heads")
    if kv_head_of is not None and (kv_head_of.min() < 0 or kv_head_of.max() >= seq.kv_heads):
        raise ValueError(f"kv_head_of names KV heads outside 0..{seq.kv_heads - 1}")
    if seq.length != prefix + q.shape[1]:
        raise ValueError(f"the chunk's keys must end at its last query: {seq.length} keys for "
                         f"prefix {prefix} + {q.shape[1]} queries")


def _scores_last_queries(q, k, prefix, last_q, scale, kv_head_of=None):
    """Softmax of the last ``last_q`` chunk queries over all keys, ``[H, n, Tk]`` fp32, and their positions."""
    _check(q, k, k)
    heads, q_len, dim = q.shape
    n = min(last_q, q_len)
    scale = dim ** -0.5 if scale is None else scale
    pos = prefix + q_len - n + torch.arange(n, device=q.device)
    k_per_head = k.float()[_kv_head_of(heads, k.shape[0], kv_head_of)]
    scores = torch.bmm(q[:, -n:].float() * scale, k_per_head.transpose(1, 2))
    keys = torch.arange(k.shape[1], device=q.device)
    scores = scores.masked_fill(keys[None, None] > pos[None, :, None], float("-inf"))
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


def reference_last_query_sums(q, k, prefix: int, last_q: int, scale: float | None = None,
                              kv_head_of: torch.Tensor | None = None):
    """``(vertical [H, Tk], slash [H, Tk])``: the attention mass of the chunk's last ``last_q``
    queries on each key column and on each diagonal offset, summed over those queries."""
    probs, pos = _scores_last_queries(q, as_seq(k).keys(), prefix, last_q, scale, kv_head_of)
    return probs.sum(1), diagonal_sums(probs, pos)


def last_query_sums(q, k: torch.Tensor | SeqKV, prefix: int, last_q: int, scale: float | None = None,
                    kv_head_of: torch.Tensor | None = None):
    """``reference_last_query_sums`` without the ``[H, last_q, Tk]`` probabilities: fused in C++ on
    CPU (reading a paged cache in place), in Triton on CUDA (power-of-two head_dim; a paged cache's keys
    gathered first).
    ``kv_head_of[h]`` is query head h's KV head (default: GQA groups in order)."""
    seq = as_seq(k)
    check_chunk_keys(q, seq, prefix, kv_head_of)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    n = min(last_q, q.shape[1])
    if q.device.type == "cpu" and seq.device.type == "cpu":
        from fastctx.kernels._cpu_ext import cpu_ops

        heads_map = _kv_head_of(q.shape[0], seq.kv_heads, kv_head_of).to(torch.int32)
        return cpu_ops().last_query_sums(q[:, -n:].float().contiguous(), seq.kv.key,
                                         seq.table_row.to(torch.int32).contiguous(), seq.length, heads_map, scale)
    if q.is_cuda:
        from fastctx.kernels.sparse_triton import last_query_sums_triton, triton_head_dim

        if triton_head_dim(q.shape[-1]):
            keys = seq.keys()  # a paged cache's keys gathered: far less than the reference's probabilities
            if kv_head_of is not None:
                keys = keys[kv_head_of.long()]  # one KV head per query head: a group of one
            return last_query_sums_triton(q, keys, prefix, last_q, scale)
    return reference_last_query_sums(q, seq, prefix, last_q, scale, kv_head_of)


def pool_blocks(x: torch.Tensor, block: int, op: str = "mean") -> torch.Tensor:
    """Sum or mean over consecutive blocks of the token axis: ``[..., T, C]`` -> ``[..., ceil(T/block), C]``.

    The last, partial block is averaged over its real tokens only.
    """
    t = x.shape[-2]
    n = -(-t // block)
    summed = torch.nn.functional.pad(x, (0, 0, 0, n * block - t)).unflatten(-2, (n, block)).sum(-2)
    if op == "sum":
        return summed
    counts = torch.clamp(t - torch.arange(n, device=x.device) * block, max=block).to(x.dtype)
    return summed / counts[:, None]


def pooled_keys(k: torch.Tensor | SeqKV, block: int) -> torch.Tensor:
    """Block-mean keys ``[kv_heads, ceil(T/block), D]`` in float32 (C++ over a paged cache on CPU)."""
    seq = as_seq(k)
    if seq.device.type == "cpu":
        from fastctx.kernels._cpu_ext import cpu_ops

        return cpu_ops().pooled_keys(seq.kv.key, seq.table_row.to(torch.int32).contiguous(), seq.length, block)
    return pool_blocks(seq.keys().float(), block)
