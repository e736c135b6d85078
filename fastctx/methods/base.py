"""What an attention method is, and the registry that config, CLIs and docs read.

A method decides what each query reads; the attention itself is computed once,
by ``fastctx.kernels.attention.paged_attention``, for the whole batch. A method
declares the phases it handles: ``prefill`` (a request's prompt chunk) and/or
``decode`` (the one or few query tokens of a generating request). For each
phase it returns a ``Read`` (dense, a sink+local window, or a sparse index).

A method module holds its knobs (a frozen dataclass whose fields carry a
``doc`` and whose ``__post_init__`` validates them), its class (registered with
``@register``), and ``eval_section``: the fastctx config that ``fastctx-eval``
and the benchmarks run under the method's name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from fastctx.kernels.attention import Read
from fastctx.kernels.paged import PagedKV, SeqKV

PHASES = ("prefill", "decode")


class KnobError(ValueError):
    """A bad knob value; the message names the knob, the value and what to change."""


def require(ok: bool, message: str) -> None:
    if not ok:
        raise KnobError(message)


def knob(default: Any, doc: str, **kwargs) -> Any:
    """A knob field: its default and a one-line description (shown in the config reference)."""
    return dataclasses.field(default=default, metadata={"doc": doc}, **kwargs)


@dataclass(frozen=True)
class ModelShape:
    """What a method may size itself by. ``num_layers`` counts attention layers in the engine's own
    order (a hybrid model's Mamba layers are not counted)."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


@dataclass
class PrefillChunk:
    """One request's prefill chunk."""

    q: torch.Tensor  # [H, q_len, D], a view of the engine's queries
    keys: SeqKV  # every key up to the chunk's last query (cached context + the chunk)
    prefix: int  # context tokens before the chunk
    positions: torch.Tensor | None  # explicit ascending positions, or None (prefix + row)
    layer: int
    scale: float
    state: Any


@dataclass
class DecodeBatch:
    """The decode-phase requests of one step, each with one (or, verifying drafts, a few) queries."""

    query: torch.Tensor  # [T, H, D] rows of these requests
    query_start: list[int]  # row offsets into ``query``, len B + 1
    seq_lens: list[int]  # context per request, its queries included
    kv: PagedKV
    block_table: torch.Tensor  # [B, max_blocks] int32, these requests' rows
    layer: int
    scale: float
    states: list[Any]  # per request, from ``new_state``

    def keys(self, b: int) -> SeqKV:
        """Request ``b``'s context in the paged cache."""
        return SeqKV(self.kv, self.block_table[b], self.seq_lens[b])


class Method:
    name: ClassVar[str]
    summary: ClassVar[str]
    phases: ClassVar[tuple[str, ...]]
    Params: ClassVar[type | None] = None
    eval_section: ClassVar[dict | None] = None
    # Whether prefill copes with explicit, scattered query positions (else such chunks run dense).
    handles_positions: ClassVar[bool] = False
    # Whether prefill chunks of any length and context use the method (else short ones run dense).
    cheap_prefill: ClassVar[bool] = False

    def __init__(self, params: Any, shape: ModelShape):
        self.params = params
        self.shape = shape

    def new_state(self, phase: str, layer: int) -> Any:
        """Per-request, per-layer state, made when a request is first seen in ``phase``; freed with it."""
        return None

    def prefill(self, chunk: PrefillChunk) -> Read:
        raise NotImplementedError(f"{self.name} has no prefill")

    def decode(self, batch: DecodeBatch) -> Read | list[Read]:
        """One Read for every request of the batch, or a list with one per request."""
        raise NotImplementedError(f"{self.name} has no decode")


_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    for phase in cls.phases:
        if phase not in PHASES:
            raise ValueError(f"method {cls.name}: unknown phase {phase!r}")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"a method named {cls.name!r} is already registered ({_REGISTRY[cls.name].__module__})")
    _REGISTRY[cls.name] = cls
    return cls


def registered() -> dict[str, type[Method]]:
    return dict(_REGISTRY)


def names(phase: str | None = None) -> list[str]:
    return [n for n, cls in _REGISTRY.items() if phase is None or phase in cls.phases]


def get(name: str) -> type[Method]:
    return _REGISTRY[name]
