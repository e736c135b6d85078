"""Engine-free attention kernels.

Tensors are head-major and batchless, like one sequence of
``scaled_dot_product_attention``: queries ``[H, Tq, D]``, keys/values
``[Hkv, Tk, D]`` with ``H % Hkv == 0`` (GQA). A query at row ``i`` of a chunk
that follows ``P`` cached tokens sits at position ``P + i`` and sees keys
``0 .. P + i``.

Modules: ``dense`` (causal prefill), ``sparse`` (the shared sparse index and
its ops: reference, C++ CPU path), ``sparse_triton`` (GPU kernel), and the
estimators that build indexes: ``minference``, ``flexprefill``, ``lserve``.
"""

from fastctx.kernels.dense import prefill_attention, reference_prefill_attention
from fastctx.kernels.sparse import (
    SparseIndex,
    reference_sparse_prefill_attention,
    sparse_prefill_attention,
)

__all__ = [
    "SparseIndex",
    "prefill_attention",
    "reference_prefill_attention",
    "reference_sparse_prefill_attention",
    "sparse_prefill_attention",
]
