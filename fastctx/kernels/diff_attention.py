"""Differential attention (Ye et al. 2024, as in Phi-4-mini-flash) for one sequence.

Query and key heads come in adjacent pairs (heads 2i, 2i+1). For each pair the
two softmax maps each read the pair's two value heads side by side, and their
difference is normalised::

    A1 = softmax(q1 k1^T) [v1 | v2],   A2 = softmax(q2 k2^T) [v1 | v2]
    out = RMSNorm_{2d}(A1 - lambda * A2) * (1 - lambda_init)

The output's pair i fills heads 2i and 2i+1 again, so it has the query's shape.
Positions: query t sits at absolute position ``first_position + t`` over keys
0..Tk-1; a key j is visible when ``j <= pos`` and, with a window W,
``pos - j < W`` (W keys including the query's own, vLLM's convention).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def lambda_init(layer_index: int) -> float:
    return 0.8 - 0.6 * math.exp(-0.3 * layer_index)


def lambda_full(q1: torch.Tensor, k1: torch.Tensor, q2: torch.Tensor, k2: torch.Tensor, init: float) -> torch.Tensor:
    """The re-parameterised lambda from its four learned vectors."""
    return torch.exp((q1.float() * k1.float()).sum()) - torch.exp((q2.float() * k2.float()).sum()) + init


def visible_mask(num_queries: int, num_keys: int, first_position: int, window: int | None,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    pos = torch.arange(num_queries, device=device).unsqueeze(1) + first_position
    key = torch.arange(num_keys, device=device).unsqueeze(0)
    mask = key <= pos
    if window is not None:
        mask &= pos - key < window
    return mask


def pair_major(x: torch.Tensor) -> torch.Tensor:
    """``[T, H, d]`` heads reordered as (first of every pair, then second of every pair): each half is then
    one ordinary multi-head attention operand (engines attend over head-sliced views of their caches)."""
    t, heads, dim = x.shape
    return x.view(t, heads // 2, 2, dim).transpose(1, 2).reshape(t, heads, dim)


def combine(a1: torch.Tensor, a2: torch.Tensor, *, lam: torch.Tensor, init: float, norm_weight: torch.Tensor,
            eps: float = 1e-5) -> torch.Tensor:
    """``[T, H/2, 2d]`` outputs of the two maps -> ``[T, H, d]`` (pair i fills heads 2i and 2i+1)."""
    t, pairs, width = a1.shape
    diff = (a1 - lam.to(a1.dtype) * a2).float()
    normed = diff * torch.rsqrt(diff.pow(2).mean(-1, keepdim=True) + eps)
    return ((norm_weight * normed.to(a1.dtype)) * (1 - init)).reshape(t, 2 * pairs, width // 2)


def differential_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, lam: torch.Tensor,
                           init: float, norm_weight: torch.Tensor, scale: float, first_position: int,
                           window: int | None = None, eps: float = 1e-5) -> torch.Tensor:
    """``q [Tq, H, d]``, ``k, v [Tk, Hkv, d]`` -> ``[Tq, H, d]`` (H and Hkv even)."""
    tq, heads, dim = q.shape
    tk, kv_heads, _ = k.shape
    qh = q.transpose(0, 1).reshape(heads // 2, 2, tq, dim)
    kh = k.transpose(0, 1).reshape(kv_heads // 2, 2, tk, dim)
    vh = v.transpose(0, 1).reshape(kv_heads // 2, 2, tk, dim)
    v_pair = torch.cat([vh[:, 0], vh[:, 1]], dim=-1)  # [Hkv/2, Tk, 2d]
    mask = visible_mask(tq, tk, first_position, window, q.device)
    a1, a2 = (F.scaled_dot_product_attention(qh[:, i], kh[:, i], v_pair, attn_mask=mask, scale=scale,
                                             enable_gqa=True).transpose(0, 1) for i in (0, 1))
    return combine(a1, a2, lam=lam, init=init, norm_weight=norm_weight, eps=eps)
