"""vLLM's CPU paged KV cache as fastctx's ``PagedKV``, read in place.

Per layer the cache is ``[blocks, kv_heads, block_size, 2 * head_dim]``; each
(block, head) region holds K then V. With the ``vec``/``vec16`` ISAs, K is
stored dims-major (``[head_dim, block_size]``) and V row-major
(``[block_size, head_dim]``); the views below give both the logical
``[blocks, kv_heads, block_size, head_dim]`` shape without copying. Writes
always go through vLLM's own ``cpu_attn_reshape_and_cache``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fastctx.kernels.paged import PagedKV

READABLE_ISAS = ("vec", "vec16")


def why_not_readable(kv_cache: torch.Tensor, isa: str | None) -> str | None:
    if isa not in READABLE_ISAS:
        return f"KV cache layout of ISA {isa!r} is not readable in place"
    if kv_cache.dim() != 4 or kv_cache.stride(3) != 1 or kv_cache.stride(2) != kv_cache.shape[3]:
        return f"unexpected KV cache shape/strides {tuple(kv_cache.shape)}/{kv_cache.stride()}"
    return None


def cpu_paged_kv(kv_cache: torch.Tensor) -> PagedKV:
    blocks, heads, block_size, two_dim = kv_cache.shape
    dim = two_dim // 2
    sb, sh = kv_cache.stride(0), kv_cache.stride(1)
    offset = kv_cache.storage_offset()
    key = kv_cache.as_strided((blocks, heads, block_size, dim), (sb, sh, 1, block_size), offset)
    value = kv_cache.as_strided((blocks, heads, block_size, dim), (sb, sh, dim, 1), offset + block_size * dim)
    return PagedKV(key, value)


def cuda_paged_kv(kv_cache: torch.Tensor) -> PagedKV:
    """vLLM's CUDA (FlashAttention) cache of one layer, read in place: logically ``[blocks, kv_heads,
    block_size, 2 * head_dim]`` in the layer's stride order (``LBNHC`` for FlashAttention: tokens outer,
    heads inner within a block), K in the first half of the last axis and V in the second, as vLLM's
    ``do_kv_cache_update`` splits it."""
    dim = kv_cache.shape[-1] // 2
    return PagedKV(kv_cache[..., :dim], kv_cache[..., dim:])


def prefix_reader(stack, layer_cache: Callable[[int], torch.Tensor], table: torch.Tensor, start: int,
                  what: str) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, a copy of a sequence's first ``start`` K and V in vLLM's paged cache, each
    ``[start, kv_heads * head_dim]``: ``table`` is its block ids, ``layer_cache(layer)`` the layer's cache,
    ``what`` opens the error when a layout cannot be read."""
    width = stack.num_kv_heads * stack.head_dim

    def read(layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        cache = layer_cache(layer)
        problem = why_not_readable(cache, stack.isa(layer))
        if problem:
            raise RuntimeError(f"{what}: {problem}")
        kv = cpu_paged_kv(cache)
        k, v = kv.gather(table[: -(-start // kv.block_size)], start)
        return k.transpose(0, 1).reshape(start, width), v.transpose(0, 1).reshape(start, width)

    return read
