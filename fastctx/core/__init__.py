"""The engine-neutral batch core: what every engine adapter shares.

An adapter translates its engine's per-step metadata into a ``StepBatch`` (queries,
paged K/V, block table, per-request lengths, the decode/prefill split, request
ids) and calls ``AttentionRuntime.forward``; the runtime asks the configured
methods what each request reads, keeps per-request state and density counts,
and runs one attention call for the batch.
"""

from fastctx.core.batch import StepBatch, count_decodes
from fastctx.core.runtime import AttentionRuntime, DensityStats

__all__ = ["AttentionRuntime", "DensityStats", "StepBatch", "count_decodes"]
