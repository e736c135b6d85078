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

from fastctx.kernels.attention import Read
from fastctx.kernels.estimation import last_query_sums, pool_blocks, pooled_keys
from fastctx.kernels.paged import SeqKV, as_seq
from fastctx.kernels.sparse import SparseIndex, block_mask_index
from fastctx.methods.base import Method, PrefillChunk, knob, register, require

BLOCK_SELECTIONS = ("block_mass", "token_count")


@dataclass(frozen=True)
class FlexPrefillParams:
    gamma: float = knob(0.9, "attention mass the selected blocks must cover (paper: 0.9; 0.95 for Llama-3.1)")
    tau: float = knob(0.1, "sqrt-JS threshold below which a head is query-aware")
    min_budget: int = knob(1024, "per-head budget floor, tokens")
    max_budget: int | None = knob(None, "per-head budget cap, tokens (null: none)")
    block_size: int = knob(128, "block size, 32/64/128 (also the number of last queries that estimate the index)")
    block_selection: str = knob(
        "block_mass", "how many vertical/slash blocks a vertical-slash head reads: `block_mass` = the fewest blocks "
        "whose pooled attention reaches gamma (the paper's criterion, at the kernel's granularity); `token_count` = "
        "as many top blocks as the tokens that reach gamma would fill (the reference code's shortcut, which "
        "under-covers heads whose mass is spread over many blocks)")

    def __post_init__(self):
        require(self.block_selection in BLOCK_SELECTIONS,
                f"block_selection={self.block_selection!r} must be one of {', '.join(BLOCK_SELECTIONS)}")
        require(isinstance(self.gamma, (int, float)) and 0 < self.gamma <= 1,
                f"gamma={self.gamma!r} must be in (0, 1]; the paper uses 0.9 or 0.95")
        require(isinstance(self.tau, (int, float)) and self.tau >= 0,
                f"tau={self.tau!r} must be >= 0; the paper uses 0.1")
        require(self.block_size in (32, 64, 128), f"block_size={self.block_size!r} must be 32, 64 or 128")
        capped = self.max_budget is None or isinstance(self.max_budget, int) and self.max_budget >= self.min_budget
        require(isinstance(self.min_budget, int) and self.min_budget >= 0 and capped,
                f"min_budget/max_budget must satisfy 0 <= min_budget <= max_budget, got {self.min_budget!r} and "
                f"{self.max_budget!r}")


def _count_to_mass(scores: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per row, how many of the largest entries are needed to reach ``gamma`` of the row's mass."""
    sorted_scores = scores.sort(-1, descending=True).values
    cum = sorted_scores.cumsum(-1)
    return (cum < gamma * cum[..., -1:]).sum(-1) + 1


def sqrt_js_divergence(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    m = 0.5 * (p + q)
    kl = lambda a, b: (a * (torch.log(a + eps) - torch.log(b + eps))).sum(-1)  # noqa: E731
    return torch.sqrt((0.5 * kl(p, m) + 0.5 * kl(q, m)).clamp(min=0))


def block_mask(q, k: torch.Tensor | SeqKV, params: FlexPrefillParams = FlexPrefillParams(), *, prefix: int = 0,
               scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``([H, R, NKB] bool block mask, [H] bool query-aware)`` for a prefill chunk."""
    heads, q_len, dim = q.shape
    seq = as_seq(k)
    tk = seq.length
    b = params.block_size
    scale = dim ** -0.5 if scale is None else scale
    nqb, nkb = -(-q_len // b), -(-tk // b)
    group = heads // seq.kv_heads
    n = min(b, q_len)  # the last query block
    vertical, slash = last_query_sums(q, seq, prefix, n, scale)
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
    k_pooled = pooled_keys(seq, b).repeat_interleave(group, 0)  # [H, NKB, D]
    q_last = q[:, -n:].float().mean(1)  # [H, D]
    estimate = torch.softmax(torch.einsum("hd,hbd->hb", q_last, k_pooled) * scale, -1)
    query_aware = sqrt_js_divergence(estimate, vertical_b) < params.tau

    device = q.device
    first = prefix + torch.arange(nqb, device=device) * b  # chunk query blocks
    last = torch.clamp(first + b - 1, max=prefix + q_len - 1)
    diag = last // b  # the key block holding each query block's last query
    kb = torch.arange(nkb, device=device)
    visible = kb[None] <= diag[:, None]  # [R, NKB]

    mask = torch.zeros(heads, nqb, nkb, dtype=torch.bool, device=device)
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

    # Query-aware heads' blocks: on the CPU for those heads only; on an accelerator for every head, kept
    # where query-aware (finding those heads would read device values on the host).
    qa = query_aware.nonzero().flatten() if device.type == "cpu" else torch.arange(heads, device=device)
    if len(qa):
        q_pooled = pool_blocks(q[qa].float(), b, "mean")  # [Hq, R, D]
        pooled = torch.einsum("hrd,hbd->hrb", q_pooled, k_pooled[qa]) * scale
        pooled = torch.softmax(pooled.masked_fill(~visible[None], float("-inf")), -1)  # rows sum to 1
        flat = pooled.flatten(1)
        order = flat.argsort(-1, descending=True)
        cum = flat.gather(1, order).cumsum(-1)
        keep_sorted = cum <= params.gamma * nqb
        keep_sorted[:, 0] = True
        keep = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, order, keep_sorted)
        mask[qa] |= keep.view(len(qa), nqb, nkb) & query_aware[qa, None, None]
    return mask & visible[None], query_aware


def sparse_index(q, k: torch.Tensor | SeqKV, params: FlexPrefillParams = FlexPrefillParams(), *, prefix: int = 0,
                 scale: float | None = None) -> SparseIndex:
    mask, _ = block_mask(q, k, params, prefix=prefix, scale=scale)
    return block_mask_index(mask, params.block_size, q.shape[1], prefix)


@register
class FlexPrefill(Method):
    name = "flexprefill"
    summary = "context-aware sparse prefill: per-head pattern by sqrt-JS, blocks by cumulative mass (FlexPrefill)"
    phases = ("prefill",)
    Params = FlexPrefillParams
    eval_section = {"attention": "flexprefill", "flexprefill": {"gamma": 0.9, "min_budget": 512}}

    def prefill(self, chunk: PrefillChunk) -> Read:
        return Read.indexed(sparse_index(chunk.q, chunk.keys, self.params, prefix=chunk.prefix, scale=chunk.scale))
