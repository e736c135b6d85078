"""FlexPrefill (Lai et al., ICLR'25): context-aware sparse prefill.

Per head, from the last block of queries:
1. *pattern choice*: the square-root Jensen-Shannon distance between the
   block-pooled estimate (mean query . mean-pooled keys) and the true
   attention of the last queries pooled to blocks. Below ``tau`` the pooled
   estimate is trusted: the head is *query-aware* and picks blocks from the
   pooled block-level attention; otherwise it is *vertical-slash*;
2. *cumulative-attention selection*: the fewest key blocks (vertical-slash:
   columns and diagonals; query-aware: pooled blocks) whose attention mass
   reaches ``gamma``, within ``min_budget``/``max_budget`` tokens.

Returns a block mask, turned into the shared index by ``block_mask_index``.
Key blocks are aligned at absolute positions; query blocks are the chunk's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fastctx.kernels.minference import last_query_sums, pool_blocks
from fastctx.kernels.sparse import SparseIndex, block_mask_index


BLOCK_SELECTIONS = ("block_mass", "token_count")


@dataclass(frozen=True)
class FlexPrefillParams:
    gamma: float = 0.9
    tau: float = 0.1
    min_budget: int = 1024  # tokens
    max_budget: int | None = None  # tokens; None = no cap
    block_size: int = 128
    # How many vertical/slash blocks a vertical-slash head reads: "block_mass" = the fewest
    # blocks whose pooled attention reaches gamma (the paper's criterion, at the granularity
    # the kernel reads); "token_count" = as many top blocks as the tokens that reach gamma
    # would fill (the reference implementation's shortcut; it under-covers scattered mass).
    block_selection: str = "block_mass"

    def __post_init__(self):
        if self.block_selection not in BLOCK_SELECTIONS:
            raise ValueError(f"flexprefill block_selection={self.block_selection!r} must be one of "
                             f"{', '.join(BLOCK_SELECTIONS)}")
        if not 0 < self.gamma <= 1:
            raise ValueError(f"flexprefill gamma={self.gamma} must be in (0, 1]; the paper uses 0.9 or 0.95")
        if self.tau < 0:
            raise ValueError(f"flexprefill tau={self.tau} must be >= 0; the paper uses 0.1")
        if self.block_size not in (32, 64, 128):
            raise ValueError(f"flexprefill block_size={self.block_size} must be 32, 64 or 128")
        if self.min_budget < 0 or (self.max_budget is not None and self.max_budget < self.min_budget):
            raise ValueError(f"flexprefill budgets must satisfy 0 <= min_budget <= max_budget, got "
                             f"{self.min_budget} and {self.max_budget}")


def _count_to_mass(scores: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per row, how many of the largest entries are needed to reach ``gamma`` of the row's mass."""
    sorted_scores = scores.sort(-1, descending=True).values
    cum = sorted_scores.cumsum(-1)
    return (cum < gamma * cum[..., -1:]).sum(-1) + 1


def sqrt_js_divergence(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    m = 0.5 * (p + q)
    kl = lambda a, b: (a * (torch.log(a + eps) - torch.log(b + eps))).sum(-1)  # noqa: E731
    return torch.sqrt((0.5 * kl(p, m) + 0.5 * kl(q, m)).clamp(min=0))


def block_mask(q, k, params: FlexPrefillParams = FlexPrefillParams(), *, prefix: int = 0,
               scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``([H, R, NKB] bool block mask, [H] bool query-aware)`` for a prefill chunk."""
    heads, q_len, dim = q.shape
    tk = k.shape[1]
    b = params.block_size
    scale = dim ** -0.5 if scale is None else scale
    nqb, nkb = -(-q_len // b), -(-tk // b)
    group = heads // k.shape[0]
    n = min(b, q_len)  # the last query block
    vertical, slash = last_query_sums(q, k, prefix, n, scale)
    vertical /= n  # [H, Tk], sums to 1 per head
    slash /= n  # [H, Tk] over offsets
    min_blocks = max(1, math.ceil(params.min_budget / b))
    max_blocks = nkb if params.max_budget is None else max(min_blocks, math.ceil(params.max_budget / b))
    vertical_b = pool_blocks(vertical[..., None], b, "sum")[..., 0]  # [H, NKB]
    slash_b = pool_blocks(slash[..., None], b, "sum")[..., 0]  # [H, NKB] by offset block
    if params.block_selection == "block_mass":
        n_v = _count_to_mass(vertical_b, params.gamma).clamp(min_blocks, max_blocks)
        n_s = _count_to_mass(slash_b, params.gamma).clamp(min_blocks, max_blocks)
    else:  # the reference code's shortcut: as many top blocks as the top tokens would fill
        n_v = (_count_to_mass(vertical, params.gamma) // b + 1).clamp(min_blocks, max_blocks)
        n_s = (_count_to_mass(slash, params.gamma) // b + 1).clamp(min_blocks, max_blocks)
    k_pooled = pool_blocks(k.float(), b, "mean").repeat_interleave(group, 0)  # [H, NKB, D]
    q_last = q[:, -n:].float().mean(1)  # [H, D]
    estimate = torch.softmax(torch.einsum("hd,hbd->hb", q_last, k_pooled) * scale, -1)
    query_aware = sqrt_js_divergence(estimate, vertical_b) < params.tau

    first = prefix + torch.arange(nqb) * b  # chunk query blocks
    last = torch.clamp(first + b - 1, max=prefix + q_len - 1)
    diag = last // b  # the key block holding each query block's last query
    kb = torch.arange(nkb)
    visible = kb[None] <= diag[:, None]  # [R, NKB]

    mask = torch.zeros(heads, nqb, nkb, dtype=torch.bool)
    vertical_b[:, 0] = float("inf")
    slash_b[:, 0] = float("inf")
    rank_v = vertical_b.argsort(-1, descending=True).argsort(-1)  # rank of each key block
    rank_s = slash_b.argsort(-1, descending=True).argsort(-1)  # rank of each offset block
    vs = ~query_aware
    n_v = torch.where(vs, n_v, min_blocks)
    n_s = torch.where(vs, n_s, min_blocks)
    mask |= (rank_v < n_v[:, None])[:, None, :] & visible[None]
    offset = diag[:, None] - kb[None]  # [R, NKB], block offset of key block b from query block r
    take_s = rank_s.gather(1, offset.clamp(min=0).flatten().expand(heads, -1)).view(heads, nqb, nkb)
    mask |= (take_s < n_s[:, None, None]) & (offset >= 0)[None]
    # The key block of each query block's first query too, when a block straddles two.
    mask[:, torch.arange(nqb), first // b] = True

    if query_aware.any():
        qa = query_aware.nonzero().flatten()
        q_pooled = pool_blocks(q[qa].float(), b, "mean")  # [Hq, R, D]
        pooled = torch.einsum("hrd,hbd->hrb", q_pooled, k_pooled[qa]) * scale
        pooled = torch.softmax(pooled.masked_fill(~visible[None], float("-inf")), -1)  # rows sum to 1
        flat = pooled.flatten(1)
        order = flat.argsort(-1, descending=True)
        cum = flat.gather(1, order).cumsum(-1)
        keep_sorted = cum <= params.gamma * nqb
        keep_sorted[:, 0] = True
        keep = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, order, keep_sorted)
        mask[qa] |= keep.view(len(qa), nqb, nkb)
    return mask & visible[None], query_aware


def sparse_index(q, k, params: FlexPrefillParams = FlexPrefillParams(), *, prefix: int = 0,
                 scale: float | None = None) -> SparseIndex:
    mask, _ = block_mask(q, k, params, prefix=prefix, scale=scale)
    return block_mask_index(mask, params.block_size, q.shape[1], prefix)
