"""``dense``: exact causal attention through fastctx's kernel, in prefill and decode.

The reference every other method's speed and fidelity is measured against, and
the check that fastctx's batch path costs nothing: its outputs equal the
engine's own kernel.
"""

from __future__ import annotations

from fastctx.kernels.attention import Read
from fastctx.methods.base import DecodeBatch, Method, PrefillChunk, register


@register
class Dense(Method):
    name = "dense"
    summary = "exact causal attention over the paged cache (the reference)"
    phases = ("prefill", "decode")
    eval_section = {"attention": "dense"}
    handles_positions = True
    cheap_prefill = True

    def prefill(self, chunk: PrefillChunk) -> Read:
        return Read.DENSE

    def decode(self, batch: DecodeBatch) -> Read:
        return Read.DENSE
