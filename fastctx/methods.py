"""Prefill attention methods, engine-free: what an engine adapter calls per layer.

A method takes one prefill chunk of one request (queries, its new K/V and the
K/V of the context cached before it, head-major as in ``fastctx.kernels``)
and returns the attention output. Sparse methods estimate their index from
the chunk's own last queries against every key so far, so chunked prefill
and prefix-cache hits need nothing special. Each method counts the
(query, key) pairs it read against the causal total: its achieved density.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from fastctx.config import FastctxConfig
from fastctx.kernels import flexprefill, minference
from fastctx.kernels.dense import _join_prefix, prefill_attention
from fastctx.kernels.sparse import sparse_prefill_attention


MIN_SPARSE_QUERIES = 64


@dataclass
class DensityStats:
    read_pairs: int = 0
    causal_pairs: int = 0
    sparse_chunks: int = 0
    dense_chunks: int = 0

    @property
    def density(self) -> float:
        return self.read_pairs / self.causal_pairs if self.causal_pairs else 1.0

    def add(self, read: int, causal: int, sparse: bool) -> None:
        self.read_pairs += read
        self.causal_pairs += causal
        self.sparse_chunks += sparse
        self.dense_chunks += not sparse

    def as_dict(self) -> dict:
        return {"density": round(self.density, 4), "read_pairs": self.read_pairs,
                "causal_pairs": self.causal_pairs, "sparse_chunks": self.sparse_chunks,
                "dense_chunks": self.dense_chunks}


def _causal_pairs(heads: int, q_len: int, prefix: int) -> int:
    return heads * (q_len * prefix + q_len * (q_len + 1) // 2)


class PrefillMethod:
    name = "dense"

    def __init__(self, dense_below: int = 0):
        self.dense_below = dense_below
        self.stats = DensityStats()
        self._lock = threading.Lock()

    def __call__(self, q, k_new, v_new, k_prefix=None, v_prefix=None, *, scale: float, layer: int):
        prefix = 0 if k_prefix is None else k_prefix.shape[1]
        heads, q_len = q.shape[:2]
        # Short chunks (speculative-decoding verification, prompt tails) and
        # short contexts gain nothing from an index: they stay dense.
        if self.name == "dense" or q_len < MIN_SPARSE_QUERIES or prefix + q_len < self.dense_below:
            causal = _causal_pairs(heads, q_len, prefix)
            with self._lock:
                self.stats.add(causal, causal, sparse=False)
            return prefill_attention(q, k_new, v_new, k_prefix, v_prefix, scale=scale)
        # Joined once: the estimator and the kernel both read all keys so far.
        k_all, v_all, _ = _join_prefix(k_new, v_new, k_prefix, v_prefix)
        index = self.index(q, k_all, prefix=prefix, scale=scale, layer=layer)
        read, causal = index.pair_counts()
        with self._lock:
            self.stats.add(read, causal, sparse=True)
        return sparse_prefill_attention(q, k_all, v_all, index=index, scale=scale)

    def index(self, q, k, *, prefix: int, scale: float, layer: int):
        raise NotImplementedError


class MInferencePrefill(PrefillMethod):
    name = "minference"

    def __init__(self, params: minference.MInferenceParams, num_layers: int, num_heads: int,
                 dense_below: int = 0):
        super().__init__(dense_below)
        self.params = params
        self.patterns = params.layer_patterns(num_layers, num_heads)

    def index(self, q, k, *, prefix, scale, layer):
        return minference.layer_index(self.patterns[layer], q, k, prefix=prefix, last_q=self.params.last_q,
                                      block_q=self.params.block_size)


class FlexPrefill(PrefillMethod):
    name = "flexprefill"

    def __init__(self, params: flexprefill.FlexPrefillParams, dense_below: int = 0):
        super().__init__(dense_below)
        self.params = params

    def index(self, q, k, *, prefix, scale, layer):
        return flexprefill.sparse_index(q, k, self.params, prefix=prefix, scale=scale)


def build_prefill_method(cfg: FastctxConfig, num_layers: int, num_heads: int) -> PrefillMethod:
    if cfg.attention == "minference":
        return MInferencePrefill(cfg.minference, num_layers, num_heads, cfg.dense_below)
    if cfg.attention == "flexprefill":
        return FlexPrefill(cfg.flexprefill, cfg.dense_below)
    return PrefillMethod()
