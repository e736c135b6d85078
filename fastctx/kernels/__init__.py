"""Engine-free attention kernels.

Per-sequence tensors are head-major and batchless, like one sequence of
``scaled_dot_product_attention``: queries ``[H, Tq, D]``, keys/values
``[Hkv, Tk, D]`` with ``H % Hkv == 0`` (GQA). A query at row ``i`` of a chunk
that follows ``P`` cached tokens sits at position ``P + i`` and sees keys
``0 .. P + i``. Engine batches are token-major ``[T, H, D]`` over a paged cache.

Modules: ``paged`` (K/V in blocks, read in place), ``attention`` (the batch op:
dense, window or sparse per request; reference and C++ path), ``sparse`` (the
shared sparse index, its builders and single-sequence op), ``sparse_triton``
(GPU kernels), ``estimation`` (what index estimators read: last-query sums,
pooling), ``dense`` (SDPA-based dense prefill and its reference), ``lserve``
(page selection for decode).
"""

from fastctx.kernels.attention import PagedKV, Read, paged_attention, reference_paged_attention
from fastctx.kernels.dense import prefill_attention, reference_prefill_attention
from fastctx.kernels.sparse import (
    SparseIndex,
    reference_sparse_prefill_attention,
    sparse_prefill_attention,
)

__all__ = [
    "PagedKV",
    "Read",
    "SparseIndex",
    "paged_attention",
    "prefill_attention",
    "reference_paged_attention",
    "reference_prefill_attention",
    "reference_sparse_prefill_attention",
    "sparse_prefill_attention",
]
