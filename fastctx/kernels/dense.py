"""Dense causal prefill attention over an optional cached prefix.

``reference_prefill_attention`` is the plain masked-softmax definition every
fast path is tested against. ``prefill_attention`` is the fast path: torch's
flash SDPA kernel, with a cached prefix handled by attending to the prefix and
to the new chunk separately and merging the two partial results by their
log-sum-exp (an explicit offset-causal mask would make SDPA fall back to a
kernel slower than vLLM's own).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"expected [heads, tokens, head_dim] tensors, got q{tuple(q.shape)} "
                         f"k{tuple(k.shape)} v{tuple(v.shape)}")
    if k.shape != v.shape or q.shape[-1] != k.shape[-1] or q.shape[0] % k.shape[0]:
        raise ValueError(f"incompatible shapes q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}: "
                         "head_dim must match and query heads must be a multiple of KV heads")


def _join_prefix(k_new, v_new, k_prefix, v_prefix):
    if k_prefix is None or k_prefix.shape[1] == 0:
        return k_new, v_new, 0
    return torch.cat([k_prefix, k_new], 1), torch.cat([v_prefix, v_new], 1), k_prefix.shape[1]


def reference_prefill_attention(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_prefix: torch.Tensor | None = None,
    v_prefix: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention in float32 with an offset causal mask.

    ``mask`` (``[H or 1, Tq, Tk]`` bool, True = keep) further restricts which
    keys each query reads; sparse methods are defined as this with their mask.
    """
    k, v, prefix = _join_prefix(k_new, v_new, k_prefix, v_prefix)
    _check(q, k, v)
    heads, tq, dim = q.shape
    tk = k.shape[1]
    if tk != prefix + tq:
        raise ValueError(f"new keys ({tk - prefix}) must match the queries ({tq})")
    scale = dim ** -0.5 if scale is None else scale
    group = heads // k.shape[0]
    kf = k.float().repeat_interleave(group, 0)
    vf = v.float().repeat_interleave(group, 0)
    scores = torch.einsum("htd,hsd->hts", q.float(), kf) * scale
    keep = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(prefix)
    if mask is not None:
        keep = keep & mask
    scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores, -1).nan_to_num(0.0)
    return torch.einsum("hts,hsd->htd", probs, vf).to(q.dtype)


def _flash_with_lse(q, k, v, causal: bool, scale: float):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), 0.0, causal, scale=scale)[:2]
    return out[0], lse[0]


def prefill_attention(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_prefix: torch.Tensor | None = None,
    v_prefix: torch.Tensor | None = None,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """Causal attention of a chunk of queries over ``k_prefix ++ k_new``."""
    _check(q, k_new, v_new)
    if q.shape[1] != k_new.shape[1]:
        raise ValueError(f"new keys ({k_new.shape[1]}) must match the queries ({q.shape[1]})")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    has_prefix = k_prefix is not None and k_prefix.shape[1] > 0
    if not has_prefix:
        return F.scaled_dot_product_attention(
            q.unsqueeze(0), k_new.unsqueeze(0), v_new.unsqueeze(0),
            is_causal=True, scale=scale, enable_gqa=True)[0]
    if q.device.type != "cpu":
        from torch.nn.attention.bias import causal_lower_right

        k, v, _ = _join_prefix(k_new, v_new, k_prefix, v_prefix)
        bias = causal_lower_right(q.shape[1], k.shape[1])
        return F.scaled_dot_product_attention(
            q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0),
            attn_mask=bias, scale=scale, enable_gqa=True)[0]
    group = q.shape[0] // k_new.shape[0]
    expand = (lambda t: t.repeat_interleave(group, 0)) if group > 1 else (lambda t: t)
    out_p, lse_p = _flash_with_lse(q, expand(k_prefix), expand(v_prefix), False, scale)
    out_n, lse_n = _flash_with_lse(q, expand(k_new), expand(v_new), True, scale)
    # Softmax over the union = the two partial softmaxes weighted by their mass.
    w_prefix = torch.sigmoid(lse_p - lse_n).unsqueeze(-1)
    merged = out_n.float() + w_prefix * (out_p.float() - out_n.float())
    return merged.to(q.dtype)
