"""Triton GPU kernel for the shared sparse index (ranges + columns per query block).

One program per (query block, head): it walks the block's key ranges in
tiles of ``BLOCK_N`` keys, then its gathered key columns, with an online
softmax in float32 (FlashAttention's recurrence), and the causal limit on top.
Tests run it under ``TRITON_INTERPRET=1`` on CPU tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastctx.kernels.sparse import SparseIndex, joined_chunk

LOG2E = 1.4426950408889634  # the kernels' softmax runs in base 2 (exp2), the scale folded with log2(e)


def triton_head_dim(dim: int) -> bool:
    """Whether the Triton kernels take this head_dim (``tl.dot`` tiles: a power of two >= 16)."""
    return dim >= 16 and not dim & (dim - 1)


def _require_head_dim(dim: int) -> None:
    if not triton_head_dim(dim):
        raise ValueError(f"the Triton kernel needs a power-of-two head_dim >= 16, got {dim}")


@triton.jit
def _scores(q, k_tile, DOT_F32: tl.constexpr):
    """``q @ k_tile.T``: in exact float32 with ``DOT_F32`` (see ``fold_tile``), else in the inputs' dtype."""
    if DOT_F32:
        return tl.dot(q.to(tl.float32), tl.trans(k_tile.to(tl.float32)), input_precision="ieee")
    return tl.dot(q, tl.trans(k_tile))


@triton.jit
def fold_tile(q, k_tile, v_tile, ok, m_i, l_i, acc, scale_log2, DOT_F32: tl.constexpr):
    """One key tile into the online softmax (FlashAttention's recurrence, in base 2: ``scale_log2`` is
    the softmax scale times log2(e)); ``ok`` [rows, keys] says which scores count. ``DOT_F32``: both
    products in exact float32 (float32 inputs, whose default on a GPU would be TF32, and bf16 under the
    interpreter, which computes bf16 dots wrongly)."""
    s = tl.where(ok, _scores(q, k_tile, DOT_F32) * scale_log2, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    corr = tl.exp2(m_i - m_safe)
    if DOT_F32:
        pv = tl.dot(p, v_tile.to(tl.float32), input_precision="ieee")
    else:
        pv = tl.dot(p.to(v_tile.dtype), v_tile)
    return m_new, l_i * corr + tl.sum(p, 1), acc * corr[:, None] + pv


@triton.jit
def _fold(q, k_tile, v_tile, kpos, key_ok, qpos, m_i, l_i, acc, scale_log2, DOT_F32: tl.constexpr):
    ok = key_ok[None, :] & (kpos[None, :] <= qpos[:, None])
    return fold_tile(q, k_tile, v_tile, ok, m_i, l_i, acc, scale_log2, DOT_F32)


@triton.jit
def _sparse_prefill_kernel(Q, K, V, Out, RANGES, COLS, q_len, prefix, scale_log2,
                           num_blocks, group, n_ranges, n_cols, block_q,
                           stride_qh, stride_qt, stride_kh, stride_kt,
                           D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           DOT_F32: tl.constexpr):
    r = tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // group
    rows = r * block_q + tl.arange(0, BLOCK_M)
    row_ok = (tl.arange(0, BLOCK_M) < block_q) & (rows < q_len)
    qpos = prefix + rows
    dims = tl.arange(0, D)
    q = tl.load(Q + h * stride_qh + rows[:, None] * stride_qt + dims[None, :], mask=row_ok[:, None], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    last_visible = prefix + tl.minimum(r * block_q + block_q, q_len)  # exclusive
    k_base = K + kvh * stride_kh
    v_base = V + kvh * stride_kh
    range_base = RANGES + (h * num_blocks + r) * n_ranges * 2
    for x in range(0, n_ranges):
        start = tl.maximum(tl.load(range_base + 2 * x), 0)
        end = tl.minimum(tl.load(range_base + 2 * x + 1), last_visible)
        for s0 in range(start, end, BLOCK_N):
            kpos = s0 + tl.arange(0, BLOCK_N)
            key_ok = kpos < end
            k_tile = tl.load(k_base + kpos[:, None] * stride_kt + dims[None, :], mask=key_ok[:, None], other=0.0)
            v_tile = tl.load(v_base + kpos[:, None] * stride_kt + dims[None, :], mask=key_ok[:, None], other=0.0)
            m_i, l_i, acc = _fold(q, k_tile, v_tile, kpos, key_ok, qpos, m_i, l_i, acc, scale_log2, DOT_F32)
    col_base = COLS + (h * num_blocks + r) * n_cols
    for c0 in range(0, n_cols, BLOCK_N):
        idx = c0 + tl.arange(0, BLOCK_N)
        kpos = tl.load(col_base + idx, mask=idx < n_cols, other=-1)
        key_ok = (kpos >= 0) & (kpos < last_visible)
        safe = tl.where(key_ok, kpos, 0)
        k_tile = tl.load(k_base + safe[:, None] * stride_kt + dims[None, :], mask=key_ok[:, None], other=0.0)
        v_tile = tl.load(v_base + safe[:, None] * stride_kt + dims[None, :], mask=key_ok[:, None], other=0.0)
        m_i, l_i, acc = _fold(q, k_tile, v_tile, kpos, key_ok, qpos, m_i, l_i, acc, scale_log2, DOT_F32)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(Out + h * stride_qh + rows[:, None] * stride_qt + dims[None, :], out.to(Out.dtype.element_ty),
             mask=row_ok[:, None])


@triton.jit
def _score_tile(q, k_base, s0, tk, qpos, row_ok, dims, scale, D: tl.constexpr, BLOCK_N: tl.constexpr,
                DOT_F32: tl.constexpr):
    """Scores of the query rows against keys ``s0 .. s0 + BLOCK_N`` and which are causal and real."""
    keys = s0 + tl.arange(0, BLOCK_N)
    k_tile = tl.load(k_base + keys[:, None] * D + dims[None, :], mask=(keys < tk)[:, None], other=0.0)
    s = _scores(q, k_tile, DOT_F32) * scale
    ok = row_ok[:, None] & (keys[None, :] <= qpos[:, None])
    return keys, s, ok


@triton.jit
def _last_query_sums_kernel(Q, K, VERT, SLASH, n, tk, group, scale, stride_qh, stride_kh,
                            D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            DOT_F32: tl.constexpr):
    # One program per (tile of the last queries, head). Pass 1 finds each row's softmax
    # max and sum; pass 2 adds the normalized probabilities to the column sums and,
    # by diagonal offset (query position - key position), to the slash sums.
    r = tl.program_id(0)
    h = tl.program_id(1)
    rows = r * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n
    qpos = tk - n + rows
    dims = tl.arange(0, D)
    q = tl.load(Q + h * stride_qh + rows[:, None] * D + dims[None, :], mask=row_ok[:, None], other=0.0)
    k_base = K + (h // group) * stride_kh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    for s0 in range(0, tk, BLOCK_N):
        keys, s, ok = _score_tile(q, k_base, s0, tk, qpos, row_ok, dims, scale, D, BLOCK_N, DOT_F32)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), 1)
        m_i = m_new
    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    inv = 1.0 / tl.where(l_i > 0, l_i, 1.0)  # rows with l_i = 0 are masked out below
    for s0 in range(0, tk, BLOCK_N):
        keys, s, ok = _score_tile(q, k_base, s0, tk, qpos, row_ok, dims, scale, D, BLOCK_N, DOT_F32)
        p = tl.where(ok, tl.exp(s - m_safe[:, None]) * inv[:, None], 0.0)
        tl.atomic_add(VERT + h * tk + keys, tl.sum(p, 0), mask=keys < tk)
        offsets = tl.where(ok, qpos[:, None] - keys[None, :], 0)
        tl.atomic_add(SLASH + h * tk + offsets, p, mask=ok)


# TRITON_INTERPRET=1 at import time makes @triton.jit build interpreted functions.
_INTERPRETED = type(_sparse_prefill_kernel).__name__ == "InterpretedFunction"


def dot_f32(dtype: torch.dtype) -> bool:
    """Whether the kernels' dots run in exact float32: float32 inputs (a GPU's default would be TF32),
    and bf16 under the interpreter (it computes bf16 dots wrongly; GPUs keep bf16 dots)."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and _INTERPRETED)


def last_query_sums_triton(q, k, prefix: int, last_q: int, scale: float | None = None,
                           block_n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``estimation.last_query_sums`` (contiguous keys); runs on CUDA tensors (or under
    TRITON_INTERPRET)."""
    from fastctx.kernels.estimation import check_chunk_keys
    from fastctx.kernels.paged import SeqKV

    check_chunk_keys(q, SeqKV.contiguous(k), prefix)
    heads, q_len, dim = q.shape
    _require_head_dim(dim)
    n, tk = min(last_q, q_len), k.shape[1]
    q_last, k = q[:, -n:].contiguous(), k.contiguous()
    vertical = torch.zeros(heads, tk, dtype=torch.float32, device=q.device)
    slash = torch.zeros_like(vertical)
    block_m = 16 if n <= 16 else 32
    _last_query_sums_kernel[(triton.cdiv(n, block_m), heads)](
        q_last, k, vertical, slash, n, tk, heads // k.shape[0], dim ** -0.5 if scale is None else scale,
        q_last.stride(0), k.stride(0), D=dim, BLOCK_M=block_m, BLOCK_N=block_n, DOT_F32=dot_f32(q.dtype))
    return vertical, slash


def sparse_prefill_attention_triton(q, k_new, v_new, k_prefix=None, v_prefix=None, *,
                                    index: SparseIndex, scale: float | None = None,
                                    block_n: int = 64, num_warps: int | None = None,
                                    num_stages: int | None = None) -> torch.Tensor:
    """Same contract as ``sparse_prefill_attention``; runs on CUDA tensors (or under TRITON_INTERPRET).
    ``block_n``, ``num_warps`` and ``num_stages`` are the launch's tile and pipeline knobs (Triton's
    defaults for the last two when None)."""
    k, v, prefix = joined_chunk(q, k_new, v_new, k_prefix, v_prefix, index)
    heads, q_len, dim = q.shape
    _require_head_dim(dim)
    block_q = index.block_q if index.num_blocks > 1 else q_len
    block_m = max(16, triton.next_power_of_2(block_q))
    if index.num_blocks > 1 and block_m != block_q:
        raise ValueError(f"the Triton kernel needs block_q to be a power of two >= 16, got {index.block_q}")
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty_like(q)
    ranges = index.ranges.to(q.device).contiguous()
    cols = index.cols.to(q.device).contiguous()
    scale = dim ** -0.5 if scale is None else scale
    launch = {name: n for name, n in (("num_warps", num_warps), ("num_stages", num_stages)) if n is not None}
    _sparse_prefill_kernel[(index.num_blocks, heads)](
        q, k, v, out, ranges, cols, q_len, prefix, scale * LOG2E,
        index.num_blocks, heads // k.shape[0], ranges.shape[2], cols.shape[2], block_q,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        D=dim, BLOCK_M=block_m, BLOCK_N=block_n, DOT_F32=dot_f32(q.dtype), **launch)
    return out
