"""One layer's view of one engine step, in the engine's own tensors."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastctx.kernels.attention import request_positions
from fastctx.kernels.paged import PagedKV, SeqKV, single_block_table


@dataclass
class StepBatch:
    """Requests ``[0, num_decodes)`` are in their decode phase (one query each, or a few when
    verifying drafts); the rest are prefill chunks. Request ``b``'s queries are rows
    ``query_start[b]:query_start[b+1]`` of ``query`` and its context (queries included) is
    ``seq_lens[b]`` tokens in ``kv`` through ``block_table[b]``. ``positions`` are explicit
    query positions (scattered recompute); None means each request's last positions."""

    query: torch.Tensor  # [T, H, D]
    kv: PagedKV
    block_table: torch.Tensor  # [B, max_blocks] int32
    query_start: list[int]  # host, len B + 1
    seq_lens: list[int]  # host, len B
    num_decodes: int
    request_ids: list[str] | None = None  # None: the engine did not say (no per-request state kept)
    positions: torch.Tensor | None = None

    @classmethod
    def single(cls, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> StepBatch:
        """One sequence's prefill (``q`` ``[H, T, D]``, ``k``/``v`` ``[Hkv, T, D]``), as an engine would
        hand it over: for engine-free callers (fidelity runs, pattern search, tests)."""
        return cls(query=q.transpose(0, 1), kv=PagedKV.contiguous(k, v), block_table=single_block_table(q.device),
                   query_start=[0, q.shape[1]], seq_lens=[k.shape[1]], num_decodes=0)

    @property
    def num_requests(self) -> int:
        return len(self.seq_lens)

    def q_len(self, b: int) -> int:
        return self.query_start[b + 1] - self.query_start[b]

    def prefix(self, b: int) -> int:
        """Context tokens before the request's first query."""
        if self.positions is None:
            return self.seq_lens[b] - self.q_len(b)
        return int(self.positions[self.query_start[b]])

    def request_query(self, b: int) -> torch.Tensor:
        """``[H, q_len, D]``, a view."""
        return self.query[self.query_start[b]:self.query_start[b + 1]].transpose(0, 1)

    def request_keys(self, b: int) -> SeqKV:
        return SeqKV(self.kv, self.block_table[b], self.seq_lens[b])

    def request_positions(self, b: int) -> torch.Tensor:
        return request_positions(self.query_start, self.seq_lens, b, self.positions)


def count_decodes(query_lens: list[int], threshold: int) -> int:
    """How many leading requests are decodes: engines put requests of at most ``threshold``
    queries (1, or 1 + speculative tokens) first."""
    n = 0
    while n < len(query_lens) and 0 < query_lens[n] <= threshold:
        n += 1
    return n
