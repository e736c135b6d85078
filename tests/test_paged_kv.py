"""fastctx reads vLLM's CPU paged cache in place: exactly what vLLM's own writer stored."""

import pytest
import torch


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
