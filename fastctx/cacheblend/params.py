"""CacheBlend's knobs, from vLLM's ``kv_connector_extra_config`` (or any engine's equivalent dict)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from fastctx.methods.base import KnobError, knob, require


@dataclass(frozen=True)
class BlendParams:
    recompute_ratio: float = knob(0.15, "share of the reused tokens recomputed from the check layer on, those whose "
                                  "K deviates most (CacheBlend: 0.15); 1 = full prefill, 0 = reuse all")
    check_layer: int = knob(1, "layer where K deviation is measured; every token is computed up to it "
                            "(CacheBlend: 1)")
    separator: str = knob("\n###\n", "text between chunks; its token ids are searched in the prompt (LMCache's "
                          "blend_special_str). Per request, kv_transfer_params {\"chunks\": [[start, end], ...]} "
                          "gives token spans instead")
    min_chunk_tokens: int = knob(64, "pieces shorter than this are computed, not stored")
    chunk_context: str = knob("separator", "what a chunk is prefilled after when first stored: \"separator\" "
                              "(alone after the separator; shared by every prompt) or \"prompt_head\" (after the "
                              "prompt's opening up to its first chunk, as CacheBlend precomputes chunks after the "
                              "system prompt; shared only by prompts with the same opening)")
    local_cpu_gb: float = knob(2.0, "LMCache local CPU tier (GB of chunk KV kept in this process; also the pool "
                               "every other tier stages through, so > 0)")
    local_disk: str | None = knob(None, "LMCache local disk tier: a directory (kept across restarts)")
    local_disk_gb: float = knob(10.0, "size of the local disk tier (GB)")
    remote_url: str | None = knob(None, "LMCache remote tier shared by replicas, e.g. redis://127.0.0.1:6379")

    def __post_init__(self):
        require(isinstance(self.recompute_ratio, (int, float)) and 0 <= self.recompute_ratio <= 1,
                f"recompute_ratio={self.recompute_ratio!r}: use a number in [0, 1] (0.15 is CacheBlend's)")
        require(isinstance(self.check_layer, int) and self.check_layer >= 0,
                f"check_layer={self.check_layer!r}: use a layer index >= 0 (1 is CacheBlend's)")
        require(isinstance(self.separator, str) and self.separator != "",
                f"separator={self.separator!r}: use a non-empty string, e.g. \"\\n###\\n\"")
        require(self.chunk_context in ("separator", "prompt_head"),
                f"chunk_context={self.chunk_context!r}: use \"separator\" or \"prompt_head\"")
        require(isinstance(self.min_chunk_tokens, int) and self.min_chunk_tokens >= 1,
                f"min_chunk_tokens={self.min_chunk_tokens!r}: use an int >= 1")
        for name in ("local_cpu_gb", "local_disk_gb"):
            value = getattr(self, name)
            require(isinstance(value, (int, float)) and math.isfinite(value) and value >= 0,
                    f"{name}={value!r}: use a size in GB >= 0")
        require(self.local_cpu_gb > 0, f"local_cpu_gb={self.local_cpu_gb!r}: LMCache stages every tier through its "
                "CPU pool; use a size > 0 (entries of a 512-token SmolLM2 chunk take 24 MB in fp32)")
        require(self.remote_url is None or (isinstance(self.remote_url, str) and "://" in self.remote_url),
                f"remote_url={self.remote_url!r}: use an LMCache remote URL such as redis://127.0.0.1:6379")

    @classmethod
    def from_dict(cls, extra: Mapping[str, Any] | None) -> BlendParams:
        extra = dict(extra or {})
        allowed = [f.name for f in fields(cls)]
        for key in extra:
            if key not in allowed:
                raise KnobError(f"cacheblend: unknown key {key!r} in kv_connector_extra_config; allowed keys: "
                                f"{', '.join(allowed)}")
        try:
            return cls(**extra)
        except KnobError as exc:
            raise KnobError(f"cacheblend: {exc}") from None
