"""CacheBlend's fusion of stored chunk KV with selective recompute, engine-neutral.

A request's *region* (the tokens a connector fills; those before it are already
in the engine's cache) is made of tokens whose KV can be reused (they lie in a
chunk whose KV was stored when the chunk was prefilled on its own) and tokens
that must be computed (separators, chunks seen for the first time). Reused K is
re-rotated from the chunk's own positions to the region's, then, as CacheBlend
(Yao et al., EuroSys'25) and LMCache's blender do: the layers up to
``check_layer`` are computed for every token; at ``check_layer`` the reused
tokens whose fresh K deviates most from the stored K (the top
``recompute_ratio``) are selected, and from then on only they and the tokens
that must be computed go through the layers, their fresh K/V overwriting the
stored ones. ``recompute_ratio`` 1 is a full prefill; 0 reuses every stored
token and computes only what has no stored KV.

The model is reached through a ``DecoderStack`` (an engine adapter over the
model's own modules), so the same code serves any engine.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from fastctx.kernels.attention import Read, paged_attention
from fastctx.kernels.paged import PagedKV, single_block_table


class DecoderStack(Protocol):
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    dtype: torch.dtype

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor: ...

    def run_layer(self, layer: int, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None,
                  attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """One decoder layer on these tokens, with ``attend(q, k, v)`` (post-RoPE, flat heads) in place of the
        engine's attention."""
        ...

    def rotate_keys(self, layer: int, keys: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """Post-RoPE keys ``[T, kv_heads * head_dim]`` moved ``shift[t]`` positions later."""
        ...


@dataclass
class StoredSpan:
    """Stored KV ``[layers, 2, n, kv_heads * head_dim]`` (post-RoPE, computed at positions
    ``origin..origin+n-1``) of which tokens ``[skip, skip + length)`` sit at region offsets
    ``[offset, offset + length)``."""
    offset: int
    length: int
    kv: torch.Tensor
    skip: int = 0
    origin: int = 0


@dataclass
class BlendResult:
    keys: torch.Tensor  # [layers, T, kv_heads * head_dim], post-RoPE at the region's positions
    values: torch.Tensor
    reused: int = 0  # tokens with stored KV
    recomputed: int = 0  # of those, recomputed after the check layer
    computed: int = 0  # tokens without stored KV (always computed)
    selected: torch.Tensor | None = field(default=None, repr=False)  # region offsets recomputed past check_layer


def blend(stack: DecoderStack, token_ids: torch.Tensor, start: int, stored: list[StoredSpan],
          recompute_ratio: float, check_layer: int,
          prefix: Callable[[int], tuple[torch.Tensor, torch.Tensor]] | None = None) -> BlendResult:
    """KV of every layer for the region ``token_ids`` at positions ``start, start + 1, ...``.

    ``prefix(layer)`` gives the K/V ``[start, kv_heads * head_dim]`` at positions ``0..start-1`` already in
    the engine's cache (needed when ``start`` > 0)."""
    if start and prefix is None:
        raise ValueError(f"the region starts at position {start}: pass the prefix K/V before it")
    T, L = token_ids.numel(), stack.num_layers
    positions = torch.arange(start, start + T)
    width = stack.num_kv_heads * stack.head_dim
    keys = torch.zeros(L, T, width, dtype=stack.dtype)
    values = torch.zeros_like(keys)
    reusable = torch.zeros(T, dtype=torch.bool)
    shift = torch.zeros(T, dtype=torch.long)
    for s in stored:
        sl = slice(s.offset, s.offset + s.length)
        keys[:, sl] = s.kv[:, 0, s.skip:s.skip + s.length]
        values[:, sl] = s.kv[:, 1, s.skip:s.skip + s.length]
        reusable[sl] = True
        shift[sl] = positions[sl] - torch.arange(s.origin + s.skip, s.origin + s.skip + s.length)
    reused = int(reusable.sum())
    moved = reusable & (shift != 0)
    if moved.any():
        for layer in range(L):
            keys[layer, moved] = stack.rotate_keys(layer, keys[layer, moved], shift[moved])

    keep = max(0, min(reused, round(recompute_ratio * reused)))
    must = (~reusable).nonzero().flatten()
    # Ratio 0 never touches a reused token; otherwise every token runs up to the check layer.
    active = must if keep == 0 else torch.arange(T)
    result = BlendResult(keys, values, reused=reused, computed=T - reused)
    if active.numel() == 0:
        result.selected = active
        return result
    hidden, residual = stack.embed(token_ids[active]), None
    for layer in range(L):
        pk, pv = prefix(layer) if start else (keys[layer, :0], values[layer, :0])
        if pk.shape[0] != start:
            raise ValueError(f"the region starts at position {start} but the prefix holds {pk.shape[0]} tokens")
        pick = None
        q_pos = positions[active]

        def attend(q, k, v, layer=layer, pk=pk, pv=pv, active=active, q_pos=q_pos):
            nonlocal pick
            if layer == check_layer and keep < reused and active.numel() == T:
                pick = _select(k, keys[layer], reusable, keep)
            keys[layer, active] = k.to(keys.dtype)
            values[layer, active] = v.to(values.dtype)
            return _attention(stack, q, torch.cat([pk, keys[layer]]), torch.cat([pv, values[layer]]), q_pos)

        hidden, residual = stack.run_layer(layer, q_pos, hidden, residual, attend)
        if pick is not None:
            hidden, residual, active = hidden[pick], residual[pick], active[pick]
    result.selected = active[reusable[active]]
    result.recomputed = int(result.selected.numel())
    return result


def _select(fresh_k: torch.Tensor, stored_k: torch.Tensor, reusable: torch.Tensor, keep: int) -> torch.Tensor:
    """Offsets (ascending) that go on past the check layer: every token without stored KV, and the ``keep``
    reused tokens whose fresh K deviates most from the stored K (CacheBlend's HKVD tokens)."""
    deviation = (fresh_k.float() - stored_k.float()).pow(2).sum(-1)
    deviation[~reusable] = math.inf
    count = keep + int((~reusable).sum())
    return deviation.topk(count).indices.sort().values


def _attention(stack: DecoderStack, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               q_pos: torch.Tensor) -> torch.Tensor:
    """Causal attention by position (key ``j`` sits at position ``j``; a query reads keys at or before its
    own position), flat heads in and out, through fastctx's paged kernel with explicit query positions."""
    H, KH, D = stack.num_heads, stack.num_kv_heads, stack.head_dim
    kv = PagedKV.contiguous(k.view(-1, KH, D).transpose(0, 1).contiguous(),
                            v.view(-1, KH, D).transpose(0, 1).contiguous())
    out = paged_attention(q.reshape(-1, H, D).contiguous(), kv, single_block_table().unsqueeze(0),
                          [0, q.shape[0]], [k.shape[0]], [Read.DENSE], scale=stack.scale, positions=q_pos)
    return out.reshape(-1, H * D)
