"""The target's distributions along k draft chains, in one pass through its decoder layers.

Chain c is ``[last, d_c1 .. d_cL]`` at positions ``start .. start + L``; each of its tokens attends
to the cached prefix (positions ``< start``, handed over per layer by ``prefix``) and to the chain's
own earlier tokens, never to another chain. Attention runs through fastctx's paged kernel with
explicit query positions, one request per chain; a request's chains share its prefix's blocks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from fastctx.cacheblend.blend import DecoderStack
from fastctx.kernels.attention import Read, paged_attention
from fastctx.kernels.paged import PagedKV

Prefix = Callable[[int], tuple[torch.Tensor, torch.Tensor]]  # layer -> K, V [start, kv_heads * head_dim]


class ScoringStack(DecoderStack, Protocol):
    def logits(self, hidden: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """The final norm and head over the last layer's output."""
        ...


@dataclass
class Chains:
    """One request's k draft chains ``[k, L]`` after its newest token, the cache holding ``start`` tokens."""
    last_token: int
    drafts: torch.Tensor
    start: int
    prefix: Prefix | None = None


def score_chains(stack: ScoringStack, last_token: int, drafts: torch.Tensor, start: int,
                 prefix: Prefix | None) -> torch.Tensor:
    """Logits ``[k, L + 1, vocab]``: row t of chain c is the target's prediction after its first t drafts."""
    return score_batch(stack, [Chains(last_token, drafts, start, prefix)])[0]


def score_batch(stack: ScoringStack, batch: list[Chains]) -> list[torch.Tensor]:
    """``score_chains`` for several requests in one pass through the layers."""
    for item in batch:
        if item.start and item.prefix is None:
            raise ValueError(f"the chains start at position {item.start}: pass the prefix K/V before it")
    ids, positions, spans = [], [], []  # spans: (request, chain rows, tokens per chain)
    for r, item in enumerate(batch):
        k, depth = item.drafts.shape
        first = torch.full((k, 1), item.last_token, dtype=torch.long)
        ids.append(torch.cat([first, item.drafts.long()], 1).reshape(-1))
        positions.append(torch.arange(item.start, item.start + depth + 1).repeat(k))
        spans.append((r, k, depth + 1))
    ids, positions = torch.cat(ids), torch.cat(positions)
    width = stack.num_kv_heads * stack.head_dim
    empty = torch.zeros(0, width, dtype=stack.dtype)
    hidden, residual = stack.embed(ids), None
    for layer in range(stack.num_layers):
        prefixes = [item.prefix(layer) if item.start else (empty, empty) for item in batch]

        def attend(q, key, value, prefixes=prefixes):
            return _chains_attention(stack, q, key, value, prefixes, spans, positions)

        hidden, residual = stack.run_layer(layer, positions, hidden, residual, attend)
    logits = stack.logits(hidden, residual)
    out, at = [], 0
    for _, k, n in spans:
        out.append(logits[at:at + k * n].view(k, n, -1))
        at += k * n
    return out


BLOCK = 16  # tokens per block of the scoring buffer: a request's prefix is stored once, in whole blocks


def _chains_attention(stack: DecoderStack, q: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      prefixes: list[tuple[torch.Tensor, torch.Tensor]], spans: list[tuple[int, int, int]],
                      positions: torch.Tensor) -> torch.Tensor:
    """One kernel request per chain. A request's whole prefix blocks are shared by its chains through
    their block tables; each chain's own blocks hold the prefix's partial last block, then its tokens."""
    H, KH, D = stack.num_heads, stack.num_kv_heads, stack.head_dim
    keys, values, tables, starts, lens = [], [], [], [0], []
    count, row = 0, 0

    def add(k_part, v_part):  # whole blocks of [tokens, KH * D], zero-padded; returns their block ids
        nonlocal count
        pad = -k_part.shape[0] % BLOCK
        keys.append(torch.nn.functional.pad(k_part.to(key.dtype), (0, 0, 0, pad)))
        values.append(torch.nn.functional.pad(v_part.to(key.dtype), (0, 0, 0, pad)))
        ids = list(range(count, count + (k_part.shape[0] + pad) // BLOCK))
        count += len(ids)
        return ids

    for r, k, n in spans:
        pk, pv = prefixes[r]
        start = pk.shape[0]
        whole = start // BLOCK * BLOCK
        shared = add(pk[:whole], pv[:whole])
        own_k, own_v = key[row:row + k * n].view(k, n, -1), value[row:row + k * n].view(k, n, -1)
        for c in range(k):
            tables.append(shared + add(torch.cat([pk[whole:], own_k[c]]), torch.cat([pv[whole:], own_v[c]])))
            starts.append(starts[-1] + n)
            lens.append(start + n)
        row += k * n

    def paged(parts):
        return torch.cat(parts).view(count, BLOCK, KH, D).transpose(1, 2).contiguous()

    width = max(len(t) for t in tables)
    table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    out = paged_attention(q.reshape(-1, H, D).contiguous(), PagedKV(paged(keys), paged(values)), table, starts,
                          lens, [Read.DENSE] * len(tables), scale=stack.scale, positions=positions)
    return out.reshape(-1, H * D)
