"""``streaming``: attention sinks plus a local window (StreamingLLM; MInference's A-shape).

Every query reads the first ``sink`` keys and the ``local`` keys ending at
itself, exactly per query (MInference's A-shape kernel works at 64-row block
granularity, so its later rows read up to 63 keys more). Prefill and decode
read the same shape; the KV cache is kept whole (no eviction), so switching a
request to dense attention later stays possible.

Defaults: SCBench's A-shape (128 sinks + 3968 local = 4096 keys per query).
StreamingLLM itself uses 4 sinks.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastctx.kernels.attention import Read
from fastctx.methods.base import DecodeBatch, Method, PrefillChunk, knob, register, require


@dataclass(frozen=True)
class StreamingParams:
    sink: int = knob(128, "attention-sink tokens every query reads (SCBench A-shape: 128; StreamingLLM: 4)")
    local: int = knob(3968, "local window: the latest keys each query reads, itself included (SCBench: 3968)")

    def __post_init__(self):
        require(isinstance(self.sink, int) and self.sink >= 0,
                f"sink={self.sink!r} must be a token count >= 0 (SCBench's A-shape uses 128)")
        require(isinstance(self.local, int) and self.local >= 1,
                f"local={self.local!r} must be a token count >= 1 (SCBench's A-shape uses 3968)")


@register
class Streaming(Method):
    name = "streaming"
    summary = "attention sinks + local window per query (StreamingLLM / A-shape), prefill and decode"
    phases = ("prefill", "decode")
    Params = StreamingParams
    # Budgets for an 8K-context model: 1152 keys per query at most.
    eval_section = {"attention": "streaming", "decode": "streaming", "streaming": {"sink": 128, "local": 1024}}
    handles_positions = True
    cheap_prefill = True

    def __init__(self, params: StreamingParams, shape):
        super().__init__(params, shape)
        self.read = Read.window(params.sink, params.local)

    def prefill(self, chunk: PrefillChunk) -> Read:
        return self.read

    def decode(self, batch: DecodeBatch) -> Read:
        return self.read
