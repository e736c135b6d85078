"""``lserve``: streaming heads plus query-aware KV page selection (LServe, MLSys'25), prefill and decode.

A share of the KV heads (``streaming_fraction``, those a calibration file scores
least in need of full attention) become *streaming heads*: every query reads
the sinks and a local window (prefill 128 + 8192, decode 128 + 256). The other
heads read every key in prefill; in decode each reads only its best physical
pages (64 tokens) within ``token_budget`` tokens, scored against per-16-token
key min/max bounds that are kept per request and layer as the cache grows, and
re-selected every ``reselect_interval`` steps (the newest page is always read).

Pages are selected per KV head, so a group's query heads read them once; in
decode a streaming head reads the sink and the pages holding its window, as
LServe does. Where fastctx differs from OmniServe (README lists all):
streaming heads keep their whole KV cache (vLLM's cache is one pool), so only
LServe's compute saving is had; in prefill a streaming head's window is applied
per 64-query block; heads are ranked by the attention mass a sink + local
window keeps (``fastctx lserve calibrate``), not by DuoAttention's trained gates.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from fastctx.kernels import lserve as ls
from fastctx.kernels.attention import Read
from fastctx.kernels.sparse import _EMPTY, SparseIndex, streaming_index
from fastctx.methods.base import DecodeBatch, Method, ModelShape, PrefillChunk, knob, register, require

PREFILL_BLOCK_Q = 64
# `fastctx lserve calibrate --out ...` for the embedded default model (SmolLM2-135M-Instruct).
DEFAULT_MODEL_HEADS = Path(__file__).resolve().parent.parent / "data" / "lserve" / "SmolLM2-135M-Instruct.json"


@dataclass(frozen=True)
class LServeParams:
    streaming_fraction: float = knob(0.5, "share of KV heads made streaming heads, least in need of full "
                                          "attention first (LServe: 0.5); 0 keeps every head dense")
    head_scores: str | None = knob(None, "calibration file from `fastctx lserve calibrate` (per layer and KV head); "
                                         "needed when streaming_fraction is between 0 and 1")
    prefill_sink: int = knob(128, "sink tokens a streaming head reads in prefill (LServe: 128)")
    prefill_local: int = knob(8192, "local window of a streaming head in prefill (LServe: 8192)")
    decode_sink: int = knob(128, "sink tokens a streaming head reads in decode (LServe: 128)")
    decode_local: int = knob(256, "local window of a streaming head in decode (LServe: 256)")
    page_size: int = knob(64, "tokens per physical page, the unit a dense head reads in decode (LServe: 64)")
    logical_page_size: int = knob(16, "tokens per logical page, the granularity of the key min/max bounds "
                                      "(LServe: 16); divides page_size")
    token_budget: int = knob(4096, "tokens a dense head reads per decode step, newest page included (LServe: 4096)")
    reselect_interval: int = knob(4, "decode steps between page selections; between them a head reuses its "
                                     "pages plus the newest (LServe: 4)")

    def __post_init__(self):
        require(isinstance(self.streaming_fraction, (int, float)) and 0 <= self.streaming_fraction <= 1,
                f"streaming_fraction={self.streaming_fraction!r} must be in [0, 1] (LServe uses 0.5)")
        require(self.head_scores is None or (isinstance(self.head_scores, str) and Path(self.head_scores).is_file()),
                f"head_scores={self.head_scores!r} is not a file; create one with `fastctx lserve calibrate`")
        for name, low in (("prefill_sink", 0), ("prefill_local", 1), ("decode_sink", 0), ("decode_local", 1),
                          ("page_size", 1), ("logical_page_size", 1), ("reselect_interval", 1)):
            value = getattr(self, name)
            default = LServeParams.__dataclass_fields__[name].default
            require(isinstance(value, int) and value >= low,
                    f"{name}={value!r} must be an integer >= {low} (LServe uses {default})")
        require(self.page_size % self.logical_page_size == 0,
                f"logical_page_size={self.logical_page_size} must divide page_size={self.page_size} "
                "(LServe: 16 and 64)")
        require(isinstance(self.token_budget, int) and self.token_budget >= 2 * self.page_size,
                f"token_budget={self.token_budget!r} must hold at least two pages of page_size={self.page_size} "
                "(LServe uses 4096)")


def load_head_scores(path: str | Path, shape: ModelShape) -> torch.Tensor:
    """``[layers, kv_heads]`` full-attention scores from a calibration file, checked against the model."""
    try:
        data = json.loads(Path(path).read_text())
        scores = torch.tensor(data["scores"], dtype=torch.float64)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"lserve head_scores {path}: not a `fastctx lserve calibrate` file ({exc})") from exc
    want = (shape.num_layers, shape.num_kv_heads)
    if tuple(scores.shape) != want:
        raise ValueError(f"lserve head_scores {path} is for {tuple(scores.shape)} (layers, KV heads); this model "
                         f"has {want}: calibrate it with `fastctx lserve calibrate --model DIR --out FILE`")
    return scores


def streaming_kv_heads(params: LServeParams, shape: ModelShape) -> torch.Tensor:
    """``[layers, kv_heads]`` bool: the streaming heads, the lowest-scored ``streaming_fraction`` of all."""
    total = shape.num_layers * shape.num_kv_heads
    count = round(params.streaming_fraction * total)
    if count in (0, total):
        return torch.full((shape.num_layers, shape.num_kv_heads), count == total)
    require(params.head_scores is not None,
            f"lserve streaming_fraction={params.streaming_fraction} picks streaming heads by calibration scores: set "
            "lserve.head_scores to a file from `fastctx lserve calibrate --out FILE` (for the default model: "
            f"{DEFAULT_MODEL_HEADS}), or streaming_fraction to 0 or 1")
    scores = load_head_scores(params.head_scores, shape).flatten()
    chosen = torch.zeros(total, dtype=torch.bool)
    chosen[scores.argsort(stable=True)[:count]] = True
    return chosen.view(shape.num_layers, shape.num_kv_heads)


@dataclass
class DecodeState:
    """One request's decode state in one layer: key bounds, the pages last selected, the read built
    from them (reused until the next selection or the next page)."""

    stats: ls.PageStats
    pages: torch.Tensor | None = None  # [dense KV heads, K] physical page ids
    steps: int = 0
    read: Read | None = None
    newest: int = -1  # the newest page when `read` was built (always the last of `pages`)


@register
class LServe(Method):
    name = "lserve"
    summary = ("streaming heads (sinks + local window) plus query-aware KV page selection per KV head within a "
               "token budget, prefill and decode")
    phases = ("prefill", "decode")
    Params = LServeParams
    # The eval runs the embedded default model, whose calibration ships with fastctx. SmolLM2 has 3 KV
    # heads per layer: with half of them streaming, passkey at 7.8K tokens drops from 2 of 6 to 0
    # (README, *Measured*); a quarter keeps every task within one query of dense.
    eval_section = {"attention": "lserve", "decode": "lserve",
                    "lserve": {"head_scores": str(DEFAULT_MODEL_HEADS), "streaming_fraction": 0.25}}
    handles_positions = False

    def __init__(self, params: LServeParams, shape: ModelShape):
        super().__init__(params, shape)
        self.group = shape.num_heads // shape.num_kv_heads
        self.streaming_kv = streaming_kv_heads(params, shape)  # [layers, kv_heads]
        self.streaming = self.streaming_kv.repeat_interleave(self.group, 1)  # [layers, heads]
        # Per layer as Python bools: decode steps ask every layer, and tensor ops cost microseconds each.
        self._all_streaming = self.streaming_kv.all(1).tolist()
        self._any_streaming = self.streaming_kv.any(1).tolist()

    def new_state(self, phase: str, layer: int):
        return DecodeState(ls.PageStats(self.params.logical_page_size)) if phase == "decode" else None

    def prefill(self, chunk: PrefillChunk) -> Read:
        streaming = self.streaming[chunk.layer]
        p = self.params
        q_len = chunk.q.shape[1]
        if not streaming.any() or chunk.prefix + q_len <= p.prefill_local:  # every window holds every key
            return Read.DENSE
        if streaming.all():
            return Read.window(p.prefill_sink, p.prefill_local)
        index = streaming_index(len(streaming), q_len, p.prefill_sink, p.prefill_local, chunk.prefix,
                                block_q=PREFILL_BLOCK_Q)
        ranges = index.ranges.clone()
        _, last = index.block_rows()
        ranges[~streaming, :, 0] = torch.stack([torch.zeros_like(last), last + 1], -1).int()
        ranges[~streaming, :, 1] = _EMPTY
        return Read.indexed(SparseIndex(ranges, index.cols, q_len, chunk.prefix, PREFILL_BLOCK_Q))

    def decode(self, batch: DecodeBatch) -> list[Read]:
        if self._all_streaming[batch.layer]:
            return [Read.window(self.params.decode_sink, self.params.decode_local)] * len(batch.seq_lens)
        return [self._decode_read(batch, b) for b in range(len(batch.seq_lens))]

    def _decode_read(self, batch: DecodeBatch, b: int) -> Read:
        p, state = self.params, batch.states[b]
        seq_len = batch.seq_lens[b]
        budget_pages = p.token_budget // p.page_size
        newest = (seq_len - 1) // p.page_size
        if newest < budget_pages and not self._any_streaming[batch.layer]:
            return Read.DENSE
        step, state.steps = state.steps, state.steps + 1
        if state.pages is None or step % p.reselect_interval == 0:
            state.stats.extend(batch.keys(b))  # bounds are read only here: brought up to date only here
            # One selection per KV head (the max of its query heads' bounds): the group's query heads
            # then read the same pages, which the kernel reads once for all of them.
            q = batch.query[batch.query_start[b + 1] - 1]  # [H, D]: the request's last query
            state.pages = ls.select(q, state.stats, self.streaming_kv[batch.layer], p.page_size, budget_pages)
        elif state.newest != newest:  # the cache crossed into a new page since: read it too
            state.pages = torch.cat([state.pages, torch.full_like(state.pages[:, :1], newest)], 1)
        elif state.read is not None:
            return state.read  # ranges end at page ends: causality trims them to the query
        # Streaming heads read the sink and the pages holding the local window, as LServe does.
        local_start = max(0, seq_len - p.decode_local) // p.page_size * p.page_size
        ranges = ls.decode_ranges(state.pages, self.streaming_kv[batch.layer], self.group, p.page_size, p.decode_sink,
                                  local_start)
        state.read, state.newest = Read.indexed(ls.decode_index(ranges, seq_len)), newest
        return state.read
