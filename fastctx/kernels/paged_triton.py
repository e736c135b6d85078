"""Triton GPU kernel for the batch op ``paged_attention``: K/V read in place through the block table.

One launch per request, one program per (query block, head). Keys are read
where the engine keeps them: ``PagedKV`` views with any strides (vLLM's CUDA
cache is ``[blocks, kv_heads, block_size, 2 * head_dim]`` in its layer's stride
order, the K and V halves being two such views), block ids from the request's
block-table row. Reads: dense, sink + window (per query row), or a sparse index
(ranges and columns per query block). An online softmax in float32
(FlashAttention's recurrence) with the causal limit on top. Tests run it under
``TRITON_INTERPRET=1`` on CPU tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from fastctx.kernels.paged import PagedKV
from fastctx.kernels.sparse_triton import LOG2E, dot_f32, fold_tile

DENSE, WINDOW, INDEX = 0, 1, 2


@triton.jit
def _rows(base, table, kpos, ok, BS, sb, st, sd, dims, dim_ok):
    """Rows ``kpos`` of one KV head, through the block table."""
    blk = tl.load(table + kpos // BS, mask=ok, other=0).to(tl.int64)
    ptr = base + blk[:, None] * sb + (kpos % BS).to(tl.int64)[:, None] * st + dims[None, :] * sd
    return tl.load(ptr, mask=ok[:, None] & dim_ok[None, :], other=0.0)


@triton.jit
def _paged_kernel(Q, Out, K, V, TABLE, RANGES, COLS, q_len, first_pos, scale_log2, group, BS, dim,
                  stride_qt, stride_qh, stride_ot, stride_oh,
                  ksb, ksh, kst, ksd, vsb, vsh, vst, vsd,
                  sink, local, n_ranges, n_cols, index_block,
                  MODE: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  DOT_F32: tl.constexpr):
    r = tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // group
    rows = r * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < q_len
    qpos = first_pos + rows
    dims = tl.arange(0, D)
    dim_ok = dims < dim
    q = tl.load(Q + rows[:, None] * stride_qt + h * stride_qh + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    k_base = K + kvh * ksh
    v_base = V + kvh * vsh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    last_visible = first_pos + tl.minimum(r * BLOCK_M + BLOCK_M, q_len)  # exclusive
    if MODE == 2:
        n_spans = n_ranges
    elif MODE == 1:
        n_spans = 2  # the sinks, then the band of the block's windows
    else:
        n_spans = 1
    range_base = RANGES + (h * index_block + r) * n_ranges * 2
    for x in range(0, n_spans):
        if MODE == 2:
            start = tl.maximum(tl.load(range_base + 2 * x), 0)
            end = tl.minimum(tl.load(range_base + 2 * x + 1), last_visible)
        elif MODE == 1:
            band = tl.maximum(sink, first_pos + r * BLOCK_M - local + 1)
            start = tl.where(x == 0, 0, band)
            end = tl.where(x == 0, tl.minimum(tl.minimum(sink, band), last_visible), last_visible)
        else:
            start = 0
            end = last_visible
        for s0 in range(start, end, BLOCK_N):
            kpos = s0 + tl.arange(0, BLOCK_N)
            key_ok = kpos < end
            ok = key_ok[None, :] & (kpos[None, :] <= qpos[:, None])
            if MODE == 1:
                ok = ok & ((kpos[None, :] < sink) | (kpos[None, :] > qpos[:, None] - local))
            k_tile = _rows(k_base, TABLE, kpos, key_ok, BS, ksb, kst, ksd, dims, dim_ok)
            v_tile = _rows(v_base, TABLE, kpos, key_ok, BS, vsb, vst, vsd, dims, dim_ok)
            m_i, l_i, acc = fold_tile(q, k_tile, v_tile, ok, m_i, l_i, acc, scale_log2, DOT_F32)
    if MODE == 2:
        col_base = COLS + (h * index_block + r) * n_cols
        for c0 in range(0, n_cols, BLOCK_N):
            idx = c0 + tl.arange(0, BLOCK_N)
            kpos = tl.load(col_base + idx, mask=idx < n_cols, other=-1)
            key_ok = (kpos >= 0) & (kpos < last_visible)
            safe = tl.where(key_ok, kpos, 0)
            ok = key_ok[None, :] & (kpos[None, :] <= qpos[:, None])
            k_tile = _rows(k_base, TABLE, safe, key_ok, BS, ksb, kst, ksd, dims, dim_ok)
            v_tile = _rows(v_base, TABLE, safe, key_ok, BS, vsb, vst, vsd, dims, dim_ok)
            m_i, l_i, acc = fold_tile(q, k_tile, v_tile, ok, m_i, l_i, acc, scale_log2, DOT_F32)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(Out + rows[:, None] * stride_ot + h * stride_oh + dims[None, :], out.to(Out.dtype.element_ty),
             mask=row_ok[:, None] & dim_ok[None, :])


def why_not_triton_paged(query: torch.Tensor, reads, positions) -> str | None:
    """Why the Triton batch kernel cannot take these inputs, or None."""
    if positions is not None:
        return "explicit query positions"
    if query.stride(-1) != 1:
        return "the query's head_dim is not contiguous"
    for read in reads:
        if read.kind == "index":
            bq = read.index.block_q
            if read.index.positions is not None or bq < 16 or bq & (bq - 1):
                return f"an index with block_q {bq} or explicit positions (the kernel needs a power of two >= 16)"
    return None


def paged_attention_triton(query: torch.Tensor, kv: PagedKV, block_table: torch.Tensor,
                           query_start: Sequence[int], seq_lens: Sequence[int], reads, *, scale: float,
                           out: torch.Tensor, block_m: int = 32, block_n: int = 32) -> torch.Tensor:
    """``paged_attention``'s contract (no explicit positions; see ``why_not_triton_paged``)."""
    heads, dim = query.shape[1], query.shape[2]
    group = heads // kv.kv_heads
    table = block_table.to(device=query.device, dtype=torch.int32)
    dummy = torch.zeros(1, dtype=torch.int32, device=query.device)
    common = dict(D=max(16, triton.next_power_of_2(dim)), BLOCK_N=block_n,
                  DOT_F32=dot_f32(query.dtype))
    for b, read in enumerate(reads):
        q0, q1 = query_start[b], query_start[b + 1]
        if read.kind == "skip" or q1 == q0:
            continue
        q_len = q1 - q0
        ranges, cols, n_ranges, n_cols, index_block, bm = dummy, dummy, 0, 0, 0, block_m
        mode, sink, local = DENSE, 0, 0
        if read.kind == "window":
            mode, sink, local = WINDOW, read.sink, read.local
        elif read.kind == "index":
            mode, bm = INDEX, read.index.block_q
            index = read.index
            if q_len <= bm:  # one index block (a decode's, say): a tile sized to the queries, not the block
                bm = max(16, triton.next_power_of_2(q_len))
            ranges = index.ranges[:, read.block0:].to(device=query.device, dtype=torch.int32).contiguous()
            cols = index.cols[:, read.block0:].to(device=query.device, dtype=torch.int32).contiguous()
            n_ranges, n_cols, index_block = ranges.shape[2], cols.shape[2], ranges.shape[1]
        q, o = query[q0:q1], out[q0:q1]
        _paged_kernel[(triton.cdiv(q_len, bm), heads)](
            q, o, kv.key, kv.value, table[b], ranges, cols, q_len, seq_lens[b] - q_len, float(scale) * LOG2E, group,
            kv.block_size, dim, q.stride(0), q.stride(1), o.stride(0), o.stride(1),
            *kv.key.stride(), *kv.value.stride(), sink, local, n_ranges, n_cols, index_block,
            MODE=mode, BLOCK_M=bm, **common)
    return out
