"""LServe (Yang et al., MLSys'25): streaming heads + query-aware KV page selection for decode.

- *Streaming heads* read sinks + a local window (``streaming_index``):
  128 + 8192 tokens in prefill, 128 + 256 in decode.
- *Dense (retrieval) heads* keep the whole KV cache, summarised per logical
  page of 16 tokens by the channel-wise min and max of its keys. A decode
  query scores page ``j`` by ``sum_d max(q_d * kmax_jd, q_d * kmin_jd)``, an
  upper bound of ``q . k`` over the page (Quest); the top pages within a
  token budget (4096) are read, always including the newest page.

Decode attention over the selected pages is the shared sparse kernel with a
one-row chunk (``page_index``), so it needs no kernel of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastctx.kernels.sparse import SparseIndex, block_mask_index

PAGE_SIZE = 16


@dataclass(frozen=True)
class LServeParams:
    token_budget: int = 4096
    page_size: int = PAGE_SIZE
    prefill_sink: int = 128
    prefill_local: int = 8192
    decode_sink: int = 128
    decode_local: int = 256
    reselect_interval: int = 4  # decode steps between page re-selections

    def __post_init__(self):
        if self.page_size < 1 or self.token_budget < self.page_size:
            raise ValueError(f"lserve token_budget={self.token_budget} must be at least one page "
                             f"(page_size={self.page_size}); the paper uses 4096 and 16")
        if self.reselect_interval < 1:
            raise ValueError(f"lserve reselect_interval={self.reselect_interval} must be >= 1 (paper: 4)")


def page_summaries(k: torch.Tensor, page_size: int = PAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Channel-wise key min and max per page: each ``[Hkv, P, D]`` for ``k`` ``[Hkv, T, D]``."""
    kv_heads, tokens, dim = k.shape
    pages = -(-tokens // page_size)
    pad = pages * page_size - tokens
    kf = k.float()
    kmax = torch.nn.functional.pad(kf, (0, 0, 0, pad), value=float("-inf")).view(kv_heads, pages, page_size, dim)
    kmin = torch.nn.functional.pad(kf, (0, 0, 0, pad), value=float("inf")).view(kv_heads, pages, page_size, dim)
    return kmin.amin(2), kmax.amax(2)


def page_scores(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """``[H, P]`` upper bounds of ``q . k`` per page, for one decode query per head ``q`` ``[H, D]``."""
    group = q.shape[0] // kmin.shape[0]
    qf = q.float()[:, None, :]
    lo = qf * kmin.repeat_interleave(group, 0)
    hi = qf * kmax.repeat_interleave(group, 0)
    return torch.maximum(lo, hi).sum(-1)


def select_pages(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor,
                 params: LServeParams = LServeParams()) -> torch.Tensor:
    """``[H, P]`` bool: the pages each head reads, at most ``token_budget // page_size`` of them,
    always with the newest page. All pages when the context fits the budget."""
    scores = page_scores(q, kmin, kmax)
    heads, pages = scores.shape
    budget = params.token_budget // params.page_size
    if pages <= budget:
        return torch.ones(heads, pages, dtype=torch.bool)
    scores[:, -1] = float("inf")
    top = scores.topk(budget, -1).indices
    return torch.zeros(heads, pages, dtype=torch.bool).scatter_(1, top, True)


def page_index(selected: torch.Tensor, context_len: int, page_size: int = PAGE_SIZE) -> SparseIndex:
    """The index of one decode query (at position ``context_len - 1``) reading the ``selected`` pages."""
    return block_mask_index(selected[:, None, :], page_size, q_len=1, prefix=context_len - 1, block_q=1)
