import torch


def random_qkv(heads, kv_heads, q_len, prefix, dim, dtype=torch.float32, seed=0):
    """q ``[H, q_len, D]`` and k/v split into the new chunk and its cached prefix:
    ``(q, k_new, v_new, k_prefix, v_prefix)``."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(heads, q_len, dim, generator=g).to(dtype)
    k = torch.randn(kv_heads, prefix + q_len, dim, generator=g).to(dtype)
    v = torch.randn(kv_heads, prefix + q_len, dim, generator=g).to(dtype)
    return q, k[:, prefix:], v[:, prefix:], k[:, :prefix], v[:, :prefix]
