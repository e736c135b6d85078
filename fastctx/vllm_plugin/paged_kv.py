"""Reading K/V back from vLLM's CPU paged cache.

Per layer the cache is ``[blocks, kv_heads, block_size, 2 * head_dim]``; each
(block, head) region holds K then V. With the ``vec``/``vec16`` ISAs, K is
stored transposed (``[head_dim, block_size]``) and V row-major
(``[block_size, head_dim]``). Writes always go through vLLM's own
``cpu_attn_reshape_and_cache``.
"""

from __future__ import annotations

import torch


def gather_context_kv(key_cache: torch.Tensor, value_cache: torch.Tensor,
                      block_row: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of a request's first ``num_tokens`` tokens, each ``[kv_heads, num_tokens, head_dim]``.

    ``key_cache``/``value_cache`` are the halves ``[blocks, kv_heads, block_size, head_dim]``
    of the layer's cache; ``block_row`` is the request's row of the block table.
    """
    _, heads, block_size, dim = key_cache.shape
    n = -(-num_tokens // block_size)
    blocks = block_row[:n].long()
    k = key_cache[blocks].view(n, heads, dim, block_size).permute(1, 0, 3, 2)
    v = value_cache[blocks].permute(1, 0, 2, 3)
    k = k.reshape(heads, n * block_size, dim)[:, :num_tokens]
    v = v.reshape(heads, n * block_size, dim)[:, :num_tokens]
    return k, v
