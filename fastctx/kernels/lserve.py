"""LServe's decode page selection (Yang et al., MLSys'25), engine-free.

Keys are summarised per *logical* page (16 tokens) by their channel-wise min
and max. A decode query scores logical page ``j`` by
``sum_d max(q_d * kmin_jd, q_d * kmax_jd)``, an upper bound of ``q . k`` over
the page (Quest); a *physical* page (the unit read, 64 tokens) scores the max of
its logical pages (LServe's hierarchical selection). Each head reads its top
physical pages within a token budget, always with the newest page.

``PageStats`` keeps one sequence's bounds current as its cache grows: only
pages holding new keys are recomputed, from the paged cache. ``select`` and
``decode_ranges`` run one C++ call each on CPU (``csrc/lserve_cpu.cpp``); the
plain PyTorch functions below are their references.
"""

from __future__ import annotations

import torch

from fastctx.kernels._cpu_ext import cpu_ops
from fastctx.kernels.paged import SeqKV
from fastctx.kernels.sparse import _EMPTY, SparseIndex, range_slots

OPEN_END = _EMPTY - 1  # a range end past any context


def page_summaries(k: torch.Tensor, logical: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Channel-wise key min and max per logical page: each ``[Hkv, P, D]`` for ``k`` ``[Hkv, T, D]``
    (the reference that ``PageStats`` is tested against)."""
    kv_heads, tokens, dim = k.shape
    pages = -(-tokens // logical)
    pad = pages * logical - tokens
    kmin = torch.nn.functional.pad(k, (0, 0, 0, pad), value=float("inf")).view(kv_heads, pages, logical, dim)
    kmax = torch.nn.functional.pad(k, (0, 0, 0, pad), value=float("-inf")).view(kv_heads, pages, logical, dim)
    return kmin.amin(2), kmax.amax(2)


SPAN = 64  # logical pages per span of PageStats storage (csrc/lserve_cpu.cpp: kSpan)


class PageStats:
    """Per-logical-page key bounds of one sequence in one layer, in the keys' dtype (exact: every bound
    is one of the keys). Stored in spans of ``SPAN`` pages, dims-major inside a span, ``[Hkv, spans, D,
    SPAN]`` each: selection scores a span's pages in vector lanes and streams the spans in order.
    Storage starts a quarter larger than the first extent and then grows by doubling."""

    def __init__(self, logical: int):
        self.logical = logical
        self.length = 0  # tokens summarised
        self._kmin = self._kmax = None

    @property
    def pages(self) -> int:
        return -(-self.length // self.logical)

    def bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``[Hkv, pages, D]`` copies of the key min and max."""
        return tuple(b.transpose(2, 3).flatten(1, 2)[:, :self.pages] for b in (self._kmin, self._kmax))

    def extend(self, keys: SeqKV, cpu_kernel: bool = True) -> None:
        """Summarises keys up to ``keys.length``: the last, partial page again plus any new pages (on CPU
        with the C++ kernel unless ``cpu_kernel`` is False)."""
        if keys.length <= self.length:
            return
        first = self.length // self.logical  # first page with new keys
        end = -(-keys.length // self.logical)
        key = keys.kv.key
        spans = -(-end // SPAN)
        if self._kmin is None or spans > self._kmin.shape[1]:
            # A quarter more than the prompt needs at first: decode steps then append for a long while
            # before the bounds are copied into larger storage.
            capacity = max(spans + spans // 4 + 1, 2 * (0 if self._kmin is None else self._kmin.shape[1]))
            grown = [torch.empty(key.shape[1], capacity, key.shape[3], SPAN, dtype=key.dtype, device=key.device)
                     for _ in range(2)]
            if self._kmin is not None:
                used = -(-self.pages // SPAN)
                for new, old in zip(grown, (self._kmin, self._kmax)):
                    new[:, :used] = old[:, :used]
            self._kmin, self._kmax = grown
        if key.device.type == "cpu" and cpu_kernel:
            cpu_ops().lserve_extend(key, keys.table_row, first * self.logical, keys.length, self.logical,
                                    self._kmin, self._kmax)
        else:
            k = keys.kv.read_range(key, keys.table_row, first * self.logical, keys.length)
            for new, store in zip(page_summaries(k, self.logical), (self._kmin, self._kmax)):
                for span in range(first // SPAN, -(-end // SPAN)):
                    lo, hi = max(first, span * SPAN), min(end, (span + 1) * SPAN)
                    store[:, span, :, lo - span * SPAN:hi - span * SPAN] = new[:, lo - first:hi - first].transpose(1, 2)
        self.length = keys.length


def select(q: torch.Tensor, stats: PageStats, streaming_kv: torch.Tensor, page_size: int,
           budget_pages: int) -> torch.Tensor:
    """``[dense KV heads, K]`` ascending page ids, newest last: for each KV head that is not streaming,
    its best pages for the query heads ``q`` ``[H, D]`` (a page scores the max over the group)."""
    if q.device.type == "cpu":
        return cpu_ops().lserve_select(q, stats._kmin, stats._kmax, stats.pages, streaming_kv, stats.logical,
                                       page_size, budget_pages)
    return reference_select(q, *stats.bounds(), streaming_kv, stats.logical, page_size, budget_pages)


def reference_select(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, streaming_kv: torch.Tensor,
                     logical: int, page_size: int, budget_pages: int) -> torch.Tensor:
    kv_heads = len(streaming_kv)
    scores = page_scores(q, kmin, kmax).view(kv_heads, q.shape[0] // kv_heads, -1).amax(1)
    return select_pages(scores[~streaming_kv], logical, page_size, budget_pages)


def page_scores(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """``[H, P]`` upper bounds of ``q . k`` per logical page, for one query per head ``q`` ``[H, D]``:
    ``max(q kmin, q kmax) = relu(q) kmax + min(q, 0) kmin``, two batched products over KV heads."""
    kv_heads = kmin.shape[0]
    group = q.shape[0] // kv_heads
    qg = q.to(kmin.dtype).view(kv_heads, group, -1).transpose(1, 2)  # [Hkv, D, group]
    pos = qg.clamp(min=0)
    scores = torch.bmm(kmax, pos).float() + torch.bmm(kmin, qg - pos).float()  # [Hkv, P, group]
    return scores.permute(0, 2, 1).reshape(q.shape[0], -1)


def select_pages(scores: torch.Tensor, logical: int, page_size: int, budget_pages: int) -> torch.Tensor:
    """``[H, K]`` ascending physical page ids each head reads: its ``budget_pages - 1`` best by the max
    of their logical pages' ``scores`` ``[H, P]``, plus the newest page. Every page when they fit."""
    heads, logical_pages = scores.shape
    per = page_size // logical
    pages = -(-logical_pages // per)
    if pages <= budget_pages:
        return torch.arange(pages, device=scores.device).expand(heads, -1)
    padded = torch.nn.functional.pad(scores, (0, pages * per - logical_pages), value=float("-inf"))
    physical = padded.view(heads, pages, per).amax(-1)
    top = physical[:, :-1].topk(budget_pages - 1, -1).indices
    newest = torch.full((heads, 1), pages - 1, dtype=top.dtype, device=top.device)
    return torch.cat([top, newest], 1).sort(-1).values


def page_ranges(page_ids: torch.Tensor, page_size: int, length: int) -> torch.Tensor:
    """``[H, NR, 2]`` key ranges (start, end) of each head's ascending ``page_ids``, adjacent pages merged
    into one range; unused slots empty and last."""
    heads, k = page_ids.shape
    ids = page_ids.long()
    new_run = torch.ones(heads, k, dtype=torch.bool, device=ids.device)
    new_run[:, 1:] = ids[:, 1:] != ids[:, :-1] + 1
    run = new_run.long().cumsum(1) - 1  # run number of each page
    runs = range_slots(run[:, -1], k)  # at most one run per page
    empty = torch.full((heads, runs), _EMPTY, dtype=torch.long, device=ids.device)  # runs a head lacks stay empty
    start = empty.scatter_reduce(1, run, ids * page_size, "amin", include_self=False)
    end = empty.scatter_reduce(1, run, torch.clamp((ids + 1) * page_size, max=length), "amax", include_self=False)
    return torch.stack([start, end], -1).int()


def decode_ranges(pages: torch.Tensor, streaming_kv: torch.Tensor, group: int, page_size: int, sink: int,
                  local_start: int) -> torch.Tensor:
    """``[H, NR, 2]`` ranges per query head: a dense KV head's query heads read its ``pages`` (each range
    ending at its page's end), a streaming one's read ``[0, sink)`` and everything from
    ``local_start`` on (causality trims both to the query)."""
    if pages.device.type == "cpu":
        return cpu_ops().lserve_ranges(pages, streaming_kv, group, page_size, sink, local_start)
    return reference_decode_ranges(pages, streaming_kv, group, page_size, sink, local_start)


def reference_decode_ranges(pages: torch.Tensor, streaming_kv: torch.Tensor, group: int, page_size: int, sink: int,
                            local_start: int) -> torch.Tensor:
    dense = page_ranges(pages, page_size, OPEN_END)
    slots = max(dense.shape[1], 2)
    ranges = torch.full((len(streaming_kv), slots, 2), _EMPTY, dtype=torch.int32, device=pages.device)
    ranges[~streaming_kv, :dense.shape[1]] = dense
    ranges[streaming_kv, :2] = torch.tensor([[0, min(sink, local_start)], [local_start, OPEN_END]], dtype=torch.int32,
                                            device=pages.device)
    return ranges.repeat_interleave(group, 0)


DECODE_BLOCK_Q = 1 << 16  # a decode's queries (one, or a few verifying drafts) are one index block


def decode_index(ranges: torch.Tensor, seq_len: int) -> SparseIndex:
    """One decode request's index: every head's ``ranges`` ``[H, NR, 2]`` (causality on top) for the
    queries at the end of ``seq_len`` keys. Ranges may end past the context: the index stays valid
    while the request grows."""
    heads = ranges.shape[0]
    return SparseIndex(ranges[:, None], torch.full((heads, 1, 1), -1, dtype=torch.int32, device=ranges.device), 1,
                       prefix=seq_len - 1, block_q=DECODE_BLOCK_Q)
