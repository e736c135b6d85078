"""Attention of a whole engine batch over a paged KV cache: one op for decodes and prefill chunks.

Queries are token-major ``[T, H, D]`` as engines hold them; request ``b`` owns
rows ``query_start[b]:query_start[b+1]`` and has ``seq_lens[b]`` tokens of
context (its queries included), its K/V in ``kv`` through ``block_table[b]``.
Its queries sit at the last positions of that context, or at explicit
``positions`` (ascending per request; CacheBlend's scattered recompute).

What each request reads is a ``Read``:
- ``Read.DENSE``: every key up to the query (causal);
- ``Read.window(sink, local)``: the first ``sink`` keys and the ``local`` keys
  ending at the query, per query row (StreamingLLM, A-shape);
- ``Read.indexed(index, block0)``: a ``SparseIndex``; its block ``block0 + i``
  covers the request's i-th block of queries (a decode batch can share one
  index with one block per request);
- ``Read.SKIP``: rows left untouched (the engine's own kernel computes them).

``paged_attention`` runs the C++ kernel on CPU tensors and the reference
elsewhere; ``why_not_cpu`` / ``why_not_triton_sparse`` say why a path cannot run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from fastctx.kernels import sparse
from fastctx.kernels._cpu_ext import cpu_ops
from fastctx.kernels.paged import PagedKV, single_block_table
from fastctx.kernels.sparse import SparseIndex, index_pair_counts, reference_attention_rows, rows_mask

__all__ = ["PagedKV", "Read", "paged_attention", "read_recall", "reference_paged_attention",
           "single_block_table", "why_not_cpu", "why_not_triton_sparse"]

_MODES = {"skip": -1, "dense": 0, "window": 1, "index": 2}


@dataclass(frozen=True)
class Read:
    kind: str  # one of _MODES
    sink: int = 0
    local: int = 0
    index: SparseIndex | None = None
    block0: int = 0

    DENSE: ClassVar[Read]
    SKIP: ClassVar[Read]

    @classmethod
    def window(cls, sink: int, local: int) -> Read:
        if sink < 0 or local < 1:
            raise ValueError(f"a window read needs sink >= 0 and local >= 1, got sink={sink} local={local}")
        return cls("window", sink=sink, local=local)

    @classmethod
    def indexed(cls, index: SparseIndex, block0: int = 0) -> Read:
        return cls("index", index=index, block0=block0)

    def mask(self, row_pos: torch.Tensor, num_keys: int, rows: torch.Tensor | None = None) -> torch.Tensor | None:
        """``[H or 1, n, num_keys]`` bool of what the request's query ``rows`` (default: all, in order)
        at positions ``row_pos`` read besides causality; None when only causality restricts them."""
        keys = torch.arange(num_keys)
        if self.kind == "dense":
            return None
        if self.kind == "window":
            return ((keys[None] < self.sink) | (keys[None] > row_pos[:, None] - self.local))[None]
        rows = torch.arange(len(row_pos)) if rows is None else rows.long()
        blocks = self.block0 + rows // self.index.block_q
        return rows_mask(self.index.ranges[:, blocks], self.index.cols[:, blocks], row_pos, num_keys)

    def pair_counts(self, row_pos: torch.Tensor, heads: int) -> tuple[int | torch.Tensor, int]:
        """(read, causal) (query, key) pairs of rows at ``row_pos``, summed over ``heads`` (an index's
        ``read`` on an accelerator stays there: ``index_pair_counts``)."""
        pos = row_pos.long()
        causal = int((pos + 1).sum()) * heads
        if self.kind == "dense":
            return causal, causal
        if self.kind == "window":
            return int(torch.clamp(pos + 1, max=self.sink + self.local).sum()) * heads, causal
        return index_pair_counts(self.index.ranges, self.index.cols, pos, self.index.block_q, self.block0,
                                 self.index.has_cols)

    def last_rows_pair_counts(self, q_len: int, seq_len: int, heads: int) -> tuple[int | torch.Tensor, int]:
        """``pair_counts`` of ``q_len`` queries at the last positions of ``seq_len`` keys, without tensor
        ops where it can (decode batches are counted every layer)."""
        first = seq_len - q_len  # position of the first query
        causal = _series(first + 1, seq_len) * heads
        if self.kind == "dense":
            return causal, causal
        if self.kind == "window":
            cap = self.sink + self.local
            capped = _series(first + 1, min(seq_len, cap)) + max(0, seq_len - max(cap, first)) * cap
            return capped * heads, causal
        index = self.index
        if q_len <= index.block_q and not index.has_cols and index.ranges.device.type == "cpu":
            from fastctx.kernels._cpu_ext import cpu_ops

            return cpu_ops().range_pairs(index.ranges[:, self.block0], first, q_len), causal
        return self.pair_counts(first + torch.arange(q_len), heads)


def _series(lo: int, hi: int) -> int:
    """lo + (lo + 1) + ... + hi (0 when hi < lo)."""
    return (hi - lo + 1) * (lo + hi) // 2 if hi >= lo else 0


Read.DENSE = Read("dense")
Read.SKIP = Read("skip")


def request_positions(query_start: Sequence[int], seq_lens: Sequence[int], b: int,
                      positions: torch.Tensor | None) -> torch.Tensor:
    """Positions of request ``b``'s queries (int64, host)."""
    q0, q1 = query_start[b], query_start[b + 1]
    if positions is not None:
        return positions[q0:q1].long().cpu()
    return seq_lens[b] - (q1 - q0) + torch.arange(q1 - q0)


def read_recall(q: torch.Tensor, k: torch.Tensor, read: Read, rows: torch.Tensor, row_pos: torch.Tensor,
                scale: float | None = None) -> torch.Tensor:
    """``[H]``: share of each head's dense softmax mass (over query ``rows`` of ``q`` ``[H, Tq, D]``, at
    positions ``row_pos``, one per row) that ``read`` covers; ``k`` ``[Hkv, Tk, D]`` holds every key."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    group = q.shape[0] // k.shape[0]
    scores = torch.einsum("htd,hsd->hts", q[:, rows].float(), k.float().repeat_interleave(group, 0)) * scale
    causal = torch.arange(k.shape[1])[None] <= row_pos[:, None]
    probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1)
    mask = read.mask(row_pos, k.shape[1], rows)
    return probs.sum(-1).mean(-1) if mask is None else (probs * mask).sum(-1).mean(-1)


def kernel_path(dtype: torch.dtype, head_dim: int) -> str:
    """The C++ kernel's inner path on this CPU: ``amx`` (bf16 through oneDNN's brgemm on AMX tiles),
    ``micro`` (AVX-512 register micro-kernels, fp32 compute) or ``sgemm`` (MKL, any x86-64 host)."""
    from fastctx.kernels._cpu_ext import cpu_ops

    return cpu_ops().kernel_path(dtype, head_dim, sparse.MICRO_KERNELS)


def why_not_cpu(query: torch.Tensor, kv: PagedKV) -> str | None:
    """Why the C++ kernel cannot take these inputs, or None."""
    if query.device.type != "cpu" or kv.key.device.type != "cpu":
        return "tensors are not on the CPU"
    dtypes = {query.dtype, kv.key.dtype, kv.value.dtype}
    if len(dtypes) != 1 or query.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"the C++ kernel takes one of float32/bfloat16/float16 for q, k and v, got {sorted(map(str, dtypes))}"
    if query.stride(-1) != 1:
        return "the query's head_dim is not contiguous"
    return None


def why_not_triton_sparse(q: torch.Tensor, index: SparseIndex) -> str | None:
    """Why the Triton single-sequence sparse kernel cannot take these inputs, or None."""
    if not q.is_cuda:
        return "tensors are not on a CUDA device"
    dim = q.shape[-1]
    if dim < 16 or dim & (dim - 1):
        return f"the Triton kernel needs a power-of-two head_dim >= 16, got {dim}"
    if index.num_blocks > 1 and (index.block_q < 16 or index.block_q & (index.block_q - 1)):
        return f"the Triton kernel needs block_q to be a power of two >= 16, got {index.block_q}"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    return None


def _check_batch(query, kv, block_table, query_start, seq_lens, reads, positions):
    if query.dim() != 3 or query.shape[-1] != kv.head_dim or query.shape[1] % kv.kv_heads:
        raise ValueError(f"query must be [tokens, heads, head_dim] with heads a multiple of {kv.kv_heads} KV heads "
                         f"and head_dim {kv.head_dim}; got {tuple(query.shape)}")
    if not len(reads) == len(seq_lens) == len(query_start) - 1 <= block_table.shape[0]:
        raise ValueError(f"{len(query_start) - 1} requests, {len(seq_lens)} lengths, {len(reads)} reads and "
                         f"{block_table.shape[0]} block-table rows do not match")
    if positions is not None and positions.shape != (query.shape[0],):
        raise ValueError(f"positions must be [tokens] = [{query.shape[0]}], got {tuple(positions.shape)}")
    for b, read in enumerate(reads):
        q_len = query_start[b + 1] - query_start[b]
        if q_len > seq_lens[b] and positions is None:
            raise ValueError(f"request {b} has {q_len} queries but a context of {seq_lens[b]} tokens")
        if read.kind == "index":
            blocks, have = -(-q_len // read.index.block_q), read.index.ranges.shape[1]
            if read.block0 < 0 or read.block0 + blocks > have or read.index.cols.shape[1] != have:
                raise ValueError(f"request {b}: {q_len} queries need index blocks {read.block0}..."
                                 f"{read.block0 + blocks - 1}, the index has {have}")


def paged_attention(query: torch.Tensor, kv: PagedKV, block_table: torch.Tensor, query_start: Sequence[int],
                    seq_lens: Sequence[int], reads: Sequence[Read], *, scale: float,
                    positions: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Writes every non-skipped request's attention into ``out`` (``[T, H, D]``, allocated if None): the C++
    kernel on CPU, the Triton kernel (``paged_triton``) on CUDA, the reference otherwise."""
    query_start, seq_lens = list(query_start), list(seq_lens)
    _check_batch(query, kv, block_table, query_start, seq_lens, reads, positions)
    out = torch.zeros_like(query) if out is None else out
    if query.is_cuda:
        from fastctx.kernels.paged_triton import paged_attention_triton, why_not_triton_paged

        if why_not_triton_paged(query, reads, positions) is None:
            return paged_attention_triton(query, kv, block_table, query_start, seq_lens, reads, scale=scale, out=out)
    if why_not_cpu(query, kv) is not None:
        return reference_paged_attention(query, kv, block_table, query_start, seq_lens, reads, scale=scale,
                                         positions=positions, out=out)
    slots: dict[int, int] = {}
    ranges, cols, block_q = [], [], []
    rows = []  # 8 ints per request, see csrc/attention_cpu.cpp
    for b, read in enumerate(reads):
        slot = 0
        if read.kind == "index":
            key = id(read.index)
            if key not in slots:
                slots[key] = len(ranges)
                ranges.append(read.index.ranges.to(torch.int32).contiguous())
                cols.append(read.index.cols.to(torch.int32).contiguous())
                block_q.append(read.index.block_q)
            slot = slots[key]
        rows += (query_start[b], query_start[b + 1] - query_start[b], seq_lens[b], _MODES[read.kind],
                 read.sink, read.local, slot, read.block0)
    table = block_table if block_table.dtype == torch.int32 else block_table.to(torch.int32)
    pos = None if positions is None else positions.to(torch.int32).contiguous()
    cpu_ops().paged_attention(query, kv.key, kv.value, table, rows, pos, ranges, cols, block_q,
                              float(scale), sparse.GATHER_BELOW, sparse.MICRO_KERNELS, out)
    return out


def reference_paged_attention(query, kv: PagedKV, block_table, query_start, seq_lens, reads, *, scale: float,
                              positions: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """The definition: per request, its K/V gathered and a masked float32 softmax (computed on the
    CPU whatever the tensors' device, written back to ``out``)."""
    out = torch.zeros_like(query) if out is None else out
    table = block_table.cpu()
    for b, read in enumerate(reads):
        if read.kind == "skip" or query_start[b + 1] == query_start[b]:
            continue
        q0, q1 = query_start[b], query_start[b + 1]
        pos = request_positions(query_start, seq_lens, b, positions)
        k, v = (t.cpu() for t in kv.gather(table[b].to(kv.key.device), seq_lens[b]))
        q = query[q0:q1].cpu().transpose(0, 1)
        o = reference_attention_rows(q, k, v, pos, read.mask(pos, seq_lens[b]), scale)
        out[q0:q1] = o.transpose(0, 1).to(out.dtype).to(out.device)
    return out
