"""fastctx reads vLLM's CPU paged cache in place: exactly what vLLM's own writer stored."""

import pytest
import torch

# At collection, before anything imports vLLM (which stands in for Triton on hosts without a Triton
# backend): the Triton kernels load interpreted.
from tests.kernel_impls import run_triton, triton_paged_attention


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("block_size,num_tokens", [(128, 1), (128, 300), (32, 97)])
def test_in_place_view_reads_what_vllm_writes(vllm_available, dtype, block_size, num_tokens):
    from vllm import _custom_ops as ops

    from fastctx.vllm_plugin.paged_kv import cpu_paged_kv

    heads, dim, num_blocks = 3, 64, 16
    g = torch.Generator().manual_seed(0)
    key = torch.randn(num_tokens, heads, dim, generator=g).to(dtype)
    value = torch.randn(num_tokens, heads, dim, generator=g).to(dtype)
    # One layer's slice of a larger allocation, as vLLM hands them out (non-zero storage offset).
    backing = torch.zeros(2, num_blocks, heads, block_size, 2 * dim, dtype=dtype)
    kv_cache = backing[1]
    key_cache, value_cache = kv_cache.view(num_blocks, heads, 2 * block_size, dim).chunk(2, dim=2)
    # Scattered, out-of-order blocks, as a block table hands them out.
    blocks = torch.randperm(num_blocks, generator=g)[: -(-num_tokens // block_size)].int()
    slots = (blocks.long()[torch.arange(num_tokens) // block_size] * block_size
             + torch.arange(num_tokens) % block_size)
    ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slots, "vec",
                                   k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")
    k, v = cpu_paged_kv(kv_cache).gather(blocks, num_tokens)
    torch.testing.assert_close(k, key.transpose(0, 1), atol=0, rtol=0)
    torch.testing.assert_close(v, value.transpose(0, 1), atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_layout_view_reads_what_flash_attention_writes_and_attends_over_it(vllm_available, dtype):
    """vLLM's CUDA cache for FlashAttention, built on CPU tensors by vLLM's own allocation code
    (``create_kv_cache_views``, layout ``LBNHC``, two layers in one buffer) and written through the
    views FlashAttention's ``do_kv_cache_update`` writes through; fastctx's in-place view reads it back,
    and the Triton batch kernel (interpreted) attends over it as the reference does."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheTensor, create_kv_cache_views
    from vllm.v1.kv_cache_layout import KVCacheLayout

    from fastctx.kernels.attention import Read, reference_paged_attention
    from fastctx.vllm_plugin.paged_kv import cuda_paged_kv

    heads, dim, block_size, num_blocks = 2, 64, 16, 12
    spec = FullAttentionSpec(block_size=block_size, num_kv_heads=heads, head_size=dim, dtype=dtype)
    page = spec.page_size_bytes
    raw = torch.zeros(2 * num_blocks * page, dtype=torch.int8)
    views = create_kv_cache_views(raw, spec, num_blocks, KVCacheLayout.LBNHC,
                                  KVCacheTensor(size=raw.numel(), layers=["a", "b"], layer_stride=num_blocks * page,
                                                block_stride=page))
    kv_cache = views[1]  # the second layer: a non-zero offset into the buffer
    assert kv_cache.shape == (num_blocks, heads, block_size, 2 * dim) and kv_cache.stride(2) != 2 * dim
    g = torch.Generator().manual_seed(0)
    lengths = [37, 5]
    tables = torch.randperm(num_blocks, generator=g)[:6].int().view(2, 3)
    key_cache, value_cache = kv_cache.transpose(1, 2).split(dim, dim=-1)  # FlashAttention's write views
    seqs = []
    for row, n in zip(tables, lengths):
        k, v = (torch.randn(n, heads, dim, generator=g).to(dtype) for _ in range(2))
        blocks, offsets = row.long()[torch.arange(n) // block_size], torch.arange(n) % block_size
        key_cache[blocks, offsets], value_cache[blocks, offsets] = k, v
        seqs.append((k, v))
    kv = cuda_paged_kv(kv_cache)
    for row, n, (k, v) in zip(tables, lengths, seqs):
        got_k, got_v = kv.gather(row, n)
        assert torch.equal(got_k, k.transpose(0, 1)) and torch.equal(got_v, v.transpose(0, 1))
    query = torch.randn(4 + 1, 4, dim, generator=g).to(dtype)  # a 4-query chunk, then a decode
    args = (query, kv, tables, [0, 4, 5], lengths, [Read.DENSE, Read.window(2, 3)])
    want = reference_paged_attention(*args, scale=0.125)
    got = run_triton(triton_paged_attention, *args, scale=0.125)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2 if dtype == torch.bfloat16 else 2e-5,
                               rtol=2e-2 if dtype == torch.bfloat16 else 2e-5)
