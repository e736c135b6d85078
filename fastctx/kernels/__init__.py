"""Engine-free attention kernels.

Tensors are head-major and batchless, like one sequence of
``scaled_dot_product_attention``: queries ``[H, Tq, D]``, keys/values
``[Hkv, Tk, D]`` with ``H % Hkv == 0`` (GQA). A query at row ``i`` of a chunk
that follows ``P`` cached tokens sits at position ``P + i`` and sees keys
``0 .. P + i``.
"""

from fastctx.kernels.dense import prefill_attention, reference_prefill_attention

__all__ = ["prefill_attention", "reference_prefill_attention"]
