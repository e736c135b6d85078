"""What CacheBlend did, per request and in total."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class RequestBlend:
    chunks_hit: int = 0
    chunks_missed: int = 0
    tokens_reused: int = 0  # KV taken from the store as is
    tokens_recomputed: int = 0  # computed by the blend (selected, separators, chunks seen first)
    load_s: float = 0.0  # fetching stored chunks (and prefilling missed ones on their own)
    blend_s: float = 0.0  # the blend forward and writing the paged cache


class BlendStats:
    def __init__(self):
        self.requests: dict[str, RequestBlend] = {}

    def add(self, req_id: str, *, hits: int, misses: int, reused: int, recomputed: int, load_s: float,
            blend_s: float) -> None:
        r = self.requests.setdefault(req_id, RequestBlend())
        r.chunks_hit += hits
        r.chunks_missed += misses
        r.tokens_reused += reused
        r.tokens_recomputed += recomputed
        r.load_s += load_s
        r.blend_s += blend_s

    def summary(self, reset: bool = False) -> dict:
        total = RequestBlend()
        for r in self.requests.values():
            for k, v in asdict(r).items():
                setattr(total, k, getattr(total, k) + v)
        out = {"requests": len(self.requests), **asdict(total),
               "per_request": {k: asdict(v) for k, v in self.requests.items()}}
        if reset:
            self.requests.clear()
        return out
