"""Per engine: the configured methods, per-request state, density counts, one attention call per layer."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch

from fastctx import methods
from fastctx.config import ENGINE, FastctxConfig
from fastctx.core.batch import StepBatch
from fastctx.kernels.attention import Read, paged_attention
from fastctx.kernels.sparse import tree_index
from fastctx.methods import DecodeBatch, Method, ModelShape, PrefillChunk

# Prefill chunks with fewer queries (prompt tails, verification of drafts) gain
# nothing from an index: they stay dense.
MIN_SPARSE_QUERIES = 64


@dataclass
class DensityStats:
    """Pairs read and chunks restricted. On an accelerator the counts an index's read gives stay
    there as tensors (adding them up needs no read-back per layer); they become ints when read."""

    read_pairs: int | torch.Tensor = 0
    causal_pairs: int = 0
    sparse_chunks: int | torch.Tensor = 0  # (request, layer) reads that a method restricted
    dense_chunks: int | torch.Tensor = 0  # (request, layer) reads of every causal key

    @property
    def density(self) -> float:
        return int(self.read_pairs) / self.causal_pairs if self.causal_pairs else 1.0

    def add(self, read: int | torch.Tensor, causal: int, sparse: int | torch.Tensor, chunks: int = 1) -> None:
        """``chunks`` (request, layer) reads with ``read`` of ``causal`` pairs, ``sparse`` of them restricted."""
        if isinstance(sparse, torch.Tensor):
            sparse = sparse.long()  # (a bool tensor cannot be subtracted)
        self.read_pairs += read
        self.causal_pairs += causal
        self.sparse_chunks += sparse
        self.dense_chunks += chunks - sparse

    def as_dict(self) -> dict:
        return {"density": round(self.density, 4), "read_pairs": int(self.read_pairs),
                "causal_pairs": self.causal_pairs, "sparse_chunks": int(self.sparse_chunks),
                "dense_chunks": int(self.dense_chunks)}


class RequestStates:
    """Method state per (request, phase, layer): made when a request is first seen, dropped when
    the engine says the request finished or was preempted."""

    def __init__(self):
        self._by_request: dict[str, dict[tuple[str, int], Any]] = {}

    def get(self, request_id: str | None, phase: str, layer: int, method: Method) -> Any:
        if request_id is None:  # the engine did not name its requests: state lives for one call
            return method.new_state(phase, layer)
        states = self._by_request.setdefault(request_id, {})
        if (phase, layer) not in states:
            states[(phase, layer)] = method.new_state(phase, layer)
        return states[(phase, layer)]

    def free(self, request_ids) -> None:
        for rid in request_ids:
            self._by_request.pop(rid, None)

    def live(self) -> list[str]:
        return list(self._by_request)


class AttentionRuntime:
    """The methods one engine runs, built from its fastctx config and model shape."""

    def __init__(self, config: FastctxConfig, shape: ModelShape):
        self.config = config
        self.shape = shape
        self.prefill_method = self._build(config.attention, "prefill")
        self.decode_method = None if config.decode == ENGINE else self._build(config.decode, "decode")
        self.stats = {"prefill": DensityStats(), "decode": DensityStats()}
        self.states = RequestStates()
        self._lock = threading.Lock()

    def _build(self, name: str, phase: str) -> Method:
        cls = methods.get(name)
        if phase not in cls.phases:
            raise ValueError(f"method {name!r} has no {phase} phase")
        return cls(self.config.params(name), self.shape)

    @property
    def engine_decodes(self) -> bool:
        """Whether decodes stay on the engine's own kernel."""
        return self.decode_method is None

    def forward(self, batch: StepBatch, layer: int, scale: float, out: torch.Tensor) -> list[Read]:
        """Attention of every request the runtime handles into ``out`` (``[T, H, D]``); decodes left
        to the engine (``engine_decodes``) are not touched. Returns what each request read."""
        reads = self.decode_reads(batch, layer, scale) + self.prefill_reads(batch, layer, scale)
        if any(r.kind != "skip" for r in reads):
            paged_attention(batch.query, batch.kv, batch.block_table, batch.query_start, batch.seq_lens, reads,
                            scale=scale, positions=batch.positions, out=out)
        return reads

    def tree_reads(self, trees: list[torch.Tensor], seq_lens: list[int]) -> list[Read]:
        """What verifying draft token trees reads (speculative decoding), one tree per request: its
        ``n`` nodes are the request's queries, their K/V written after ``seq_lens[b] - n`` context
        tokens, node ``i`` reading the context and the nodes ``trees[b][i]`` marks (itself and its
        ancestors). Dense: a decode method's selection would make verification differ from its
        decoding, so speculative decoding is refused with one."""
        if self.decode_method is not None:
            raise ValueError(f"speculative verification reads dense; the decode method "
                             f"{self.decode_method.name!r} would decode differently")
        heads = self.shape.num_heads
        return [Read.indexed(tree_index(tree, seq_len - tree.shape[0], heads))
                for tree, seq_len in zip(trees, seq_lens)]

    def decode_reads(self, batch: StepBatch, layer: int, scale: float) -> list[Read]:
        nd = batch.num_decodes
        if nd == 0:
            return []
        if self.decode_method is None:
            return [Read.SKIP] * nd
        ids = batch.request_ids
        states = [self.states.get(ids[b] if ids else None, "decode", layer, self.decode_method) for b in range(nd)]
        sub = DecodeBatch(query=batch.query[:batch.query_start[nd]], query_start=batch.query_start[:nd + 1],
                          seq_lens=batch.seq_lens[:nd], kv=batch.kv, block_table=batch.block_table[:nd],
                          layer=layer, scale=scale, states=states)
        out = self.decode_method.decode(sub)
        reads = [out] * nd if isinstance(out, Read) else list(out)
        if len(reads) != nd:
            raise ValueError(f"decode method {self.decode_method.name} returned {len(reads)} reads for {nd} requests")
        heads = batch.query.shape[1]
        read_pairs = causal_pairs = sparse = 0
        for b, read in enumerate(reads):
            if batch.positions is None:
                r, c = read.last_rows_pair_counts(batch.q_len(b), batch.seq_lens[b], heads)
            else:
                r, c = read.pair_counts(batch.request_positions(b), heads)
            read_pairs, causal_pairs, sparse = read_pairs + r, causal_pairs + c, sparse + (r < c)
        with self._lock:
            self.stats["decode"].add(read_pairs, causal_pairs, sparse, chunks=nd)
        return reads

    def prefill_reads(self, batch: StepBatch, layer: int, scale: float) -> list[Read]:
        method, reads = self.prefill_method, []
        heads = batch.query.shape[1]
        for b in range(batch.num_decodes, batch.num_requests):
            q_len, seq_len = batch.q_len(b), batch.seq_lens[b]
            short = q_len < MIN_SPARSE_QUERIES or seq_len < self.config.dense_below
            if (short and not method.cheap_prefill) or (batch.positions is not None and not method.handles_positions):
                read = Read.DENSE
            else:
                rid = batch.request_ids[b] if batch.request_ids else None
                positions = None if batch.positions is None else batch.request_positions(b)
                read = method.prefill(PrefillChunk(
                    q=batch.request_query(b), keys=batch.request_keys(b), prefix=batch.prefix(b),
                    positions=positions, layer=layer, scale=scale,
                    state=self.states.get(rid, "prefill", layer, method)))
            if batch.positions is None:
                counts = read.last_rows_pair_counts(q_len, seq_len, heads)
            else:
                counts = read.pair_counts(batch.request_positions(b), heads)
            with self._lock:
                self.stats["prefill"].add(*counts, sparse=read.kind != "dense")
            reads.append(read)
        return reads

    def free(self, request_ids) -> None:
        self.states.free(request_ids)

    def density(self, reset: bool = False) -> list[dict]:
        """Achieved density per phase handled by fastctx (the engine's own decodes are not counted)."""
        rows = []
        with self._lock:
            for phase, method in (("prefill", self.prefill_method), ("decode", self.decode_method)):
                if method is not None:
                    rows.append({"phase": phase, "method": method.name, "config": self.config.as_dict(),
                                 **self.stats[phase].as_dict()})
            if reset:
                self.stats = {"prefill": DensityStats(), "decode": DensityStats()}
        return rows
