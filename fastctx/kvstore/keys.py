"""Position-independent keys for stored chunk KV.

A key covers everything that decides whether stored KV is valid for a request:
the model's weights (a fingerprint), the KV dtype and layout, the request's
``cache_salt`` (requests with different salts never share KV) and the chunk's
own token ids, and nothing about where the chunk sits in the prompt.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

# Elements sampled per parameter for the fingerprint: enough to tell fine-tunes apart, cheap at load.
_SAMPLES = 4096


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A hash of every parameter's name, shape, dtype and an evenly strided sample of its values."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            step = max(1, flat.numel() // _SAMPLES)
            h.update(f"{name}|{tuple(p.shape)}|{p.dtype}|".encode())
            h.update(flat[::step].float().contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


@dataclass(frozen=True)
class KVFormat:
    """What a stored entry's bytes mean: ``[layers, 2, tokens, kv_heads * head_dim]`` of ``dtype``."""
    fingerprint: str
    dtype: str
    layers: int
    kv_heads: int
    head_dim: int

    def tag(self) -> str:
        return f"{self.fingerprint}:{self.dtype}:L{self.layers}:H{self.kv_heads}:D{self.head_dim}"


def chunk_key(fmt: KVFormat, token_ids: Sequence[int], cache_salt: str | None) -> str:
    """Hex key of one chunk's KV; the salt is length-prefixed so no salt/token split can collide."""
    h = hashlib.sha256()
    salt = (cache_salt or "").encode()
    h.update(fmt.tag().encode())
    h.update(len(salt).to_bytes(4, "little") + salt)
    h.update(torch.tensor(list(token_ids), dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()
