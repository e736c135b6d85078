"""CacheBlend as a vLLM KV connector: ``--kv-transfer-config '{"kv_connector": "FastctxBlendConnector",
"kv_role": "kv_both", "kv_connector_extra_config": {...}}'`` (knobs: ``fastctx.cacheblend.params``).

Scheduler side: a prompt whose chunks (between separator tokens, or the spans
in ``kv_transfer_params["chunks"]``) end at least one block past what the
prefix cache already holds gets that block-aligned region claimed as
externally computed, synchronously; everything after it (the last chunk's
tail, the question) is computed by vLLM as usual. A request may set its own
``kv_transfer_params["recompute_ratio"]``.

Worker side, before the step's forward: each chunk's KV is fetched from the
store (LMCache's tiers); a chunk seen for the first time is prefilled on its
own and stored, and computed in place this time. ``fastctx.cacheblend.blend``
fuses the region with the model's own layers, and the fused KV of every layer
is written into vLLM's paged cache with vLLM's own writer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.logger import init_logger

from fastctx.cacheblend.blend import StoredSpan, blend
from fastctx.cacheblend.chunks import ChunkSpanError, chunk_lead, spans_from_request, split_on_separator
from fastctx.cacheblend.params import BlendParams
from fastctx.cacheblend.stats import BlendStats
from fastctx.vllm_plugin.paged_kv import prefix_reader

logger = init_logger("vllm.fastctx.cacheblend")


@dataclass
class BlendPlan:
    req_id: str
    token_ids: list[int]  # the prompt up to ``end`` or the last chunk's end, whichever is later
    start: int  # first position the connector fills; the cache already holds [0, start)
    end: int
    spans: list[tuple[int, int]]  # chunk spans, prompt offsets; a span may begin before ``start``
    block_ids: list[int] = field(default_factory=list)
    cache_salt: str | None = None
    recompute_ratio: float = 0.15
    lead: list[int] = field(default_factory=list)  # what a chunk is prefilled after when stored (chunk_lead)


@dataclass
class BlendMetadata(KVConnectorMetadata):
    plans: list[BlendPlan] = field(default_factory=list)


class FastctxBlendConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self.params = BlendParams.from_dict(self._kv_transfer_config.kv_connector_extra_config)
        self.block_size = vllm_config.cache_config.block_size
        self._model_config = vllm_config.model_config
        self._separator: list[int] | None = None
        self._pending: dict[str, BlendPlan] = {}  # claimed, blocks not yet allocated
        self._ready: dict[str, BlendPlan] = {}  # blocks allocated, goes out with the next step
        self._kv_caches: dict[str, torch.Tensor] = {}
        self._worker = None  # built with the KV caches, once the model is loaded
        self.stats = BlendStats()

    # ---- scheduler side
    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int, bool]:
        prompt = list(request.prompt_token_ids or [])
        spans = self._spans(request, prompt)
        lead = chunk_lead(prompt, spans, self._separator_ids(), self.params.chunk_context)
        if lead and prompt[:len(lead)] == lead:  # the prompt's own head: a piece inside it is no chunk
            spans = [(s, e) for s, e in spans if s >= len(lead)]
        # vLLM computes at least the last prompt token; the region ends on a block boundary.
        end = min(spans[-1][1], len(prompt) - 1) if spans else 0
        end -= end % self.block_size
        if end - num_computed_tokens < self.block_size:
            return 0, False
        # Whole chunks that reach into the region (a key covers all of a chunk's tokens).
        spans = [(s, e) for s, e in spans if s < end and e > num_computed_tokens]
        if not spans:
            return 0, False
        self._pending[request.request_id] = BlendPlan(
            request.request_id, prompt[:max(end, spans[-1][1])], num_computed_tokens, end, spans,
            cache_salt=getattr(request, "cache_salt", None), recompute_ratio=self._ratio(request),
            lead=lead)
        return end - num_computed_tokens, False

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        plan = self._pending.pop(request.request_id, None)
        if plan is not None and num_external_tokens > 0:  # 0: the scheduler overrode the claim
            self._ready[request.request_id] = plan

    def build_connector_meta(self, scheduler_output) -> KVConnectorMetadata:
        meta = BlendMetadata()
        for new in scheduler_output.scheduled_new_reqs:
            plan = self._ready.pop(new.req_id, None)
            if plan is not None:
                plan.block_ids = list(new.block_ids[0])
                meta.plans.append(plan)
        # A request resumed after preemption was planned again; its new blocks replace all its old ones.
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            plan = self._ready.pop(req_id, None)
            if plan is not None and req_id in cached.resumed_req_ids and cached.new_block_ids[i] is not None:
                plan.block_ids = list(cached.new_block_ids[i][0])
                meta.plans.append(plan)
        if self._ready:
            logger.warning("cacheblend: %d claimed requests were not scheduled; they will be planned again",
                           len(self._ready))
        self._ready.clear()
        self._pending.clear()
        return meta

    def _ratio(self, request) -> float:
        """The engine's recompute_ratio, or the request's own (``kv_transfer_params["recompute_ratio"]``)."""
        value = (request.kv_transfer_params or {}).get("recompute_ratio", self.params.recompute_ratio)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            logger.warning('request %s: kv_transfer_params["recompute_ratio"]=%r is not a number in [0, 1]; '
                           "using the engine's %s", request.request_id, value, self.params.recompute_ratio)
            return self.params.recompute_ratio
        return float(value)

    def _spans(self, request, prompt: list[int]) -> list[tuple[int, int]]:
        params = request.kv_transfer_params or {}
        if "chunks" in params:
            try:
                return spans_from_request(params["chunks"], len(prompt), self.params.min_chunk_tokens)
            except ChunkSpanError as exc:
                logger.warning("request %s: %s; its chunks are not reused", request.request_id, exc)
                return []
        return split_on_separator(prompt, self._separator_ids(), self.params.min_chunk_tokens)

    def _separator_ids(self) -> list[int]:
        if self._separator is None:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(self._model_config.tokenizer,
                                                trust_remote_code=self._model_config.trust_remote_code)
            self._separator = tok.encode(self.params.separator, add_special_tokens=False)
        return self._separator

    # ---- worker side
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._kv_caches = kv_caches
        self._blend_worker()  # the model is loaded by now: a model or knob it cannot serve stops the start

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if not isinstance(meta, BlendMetadata) or not meta.plans:
            return
        worker = self._blend_worker()
        for plan in meta.plans:
            worker.run(plan)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kwargs) -> None:
        return

    def wait_for_save(self) -> None:
        return

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.store.close()

    def _blend_worker(self) -> _BlendWorker:
        if self._worker is None:
            from fastctx.vllm_plugin.worker_base import loaded_model

            self._worker = _BlendWorker(self, loaded_model())
        return self._worker


class _BlendWorker:
    """The worker half: the model as a decoder stack, the store, the paged cache."""

    def __init__(self, connector: FastctxBlendConnector, model: torch.nn.Module):
        from fastctx.kvstore.keys import KVFormat, weights_fingerprint
        from fastctx.kvstore.store import ChunkStore
        from fastctx.vllm_plugin.decoder_stack import VllmDecoderStack

        self.c = connector
        self.stack = VllmDecoderStack(model)
        self.names = self.stack.layer_names
        self.fmt = KVFormat(weights_fingerprint(model), str(self.stack.dtype).removeprefix("torch."),
                            self.stack.num_layers, self.stack.num_kv_heads, self.stack.head_dim)
        self.store = ChunkStore(connector.params, self.fmt)
        if connector.params.check_layer >= self.stack.num_layers:
            raise ValueError(f"cacheblend: check_layer={connector.params.check_layer} but the model has "
                             f"{self.stack.num_layers} layers; use a smaller check_layer")

    @torch.inference_mode()
    def run(self, plan: BlendPlan) -> None:
        from fastctx.kvstore.keys import chunk_key

        t0 = time.perf_counter()
        p = self.c.params
        stored, hits, misses = [], 0, 0
        lead = plan.lead
        for s, e in plan.spans:
            chunk = plan.token_ids[s:e]
            # A chunk is stored as prefilled after its lead (chunk_lead: the separator, or the prompt's head).
            key = chunk_key(self.fmt, lead + chunk, plan.cache_salt)
            kv = self.store.get(key, len(chunk))
            if kv is None:
                misses += 1
                alone = blend(self.stack, torch.tensor(lead + chunk), 0, [], 1.0, p.check_layer)
                self.store.put(key, torch.stack([alone.keys, alone.values], 1)[:, :, len(lead):].contiguous())
                continue
            hits += 1
            first, last = max(s, plan.start), min(e, plan.end)
            # A chunk opening the prompt sits before its stored positions: it is computed (exactly, as
            # nothing precedes it) rather than rotated backwards.
            if last > first and s >= len(lead):
                stored.append(StoredSpan(first - plan.start, last - first, kv, skip=first - s, origin=len(lead)))
        t_load = time.perf_counter()
        ids = torch.tensor(plan.token_ids[plan.start:plan.end])
        result = blend(self.stack, ids, plan.start, stored, plan.recompute_ratio, p.check_layer,
                       prefix=self._prefix_reader(plan) if plan.start else None)
        self._write(plan, result.keys, result.values)
        t_done = time.perf_counter()
        self.c.stats.add(plan.req_id, hits=hits, misses=misses, reused=result.reused - result.recomputed,
                         recomputed=result.recomputed + result.computed, load_s=t_load - t0,
                         blend_s=t_done - t_load)

    def _slots(self, plan: BlendPlan, positions: torch.Tensor) -> torch.Tensor:
        bs = self.c.block_size
        blocks = torch.tensor(plan.block_ids, dtype=torch.long)
        return blocks[positions // bs] * bs + positions % bs

    def _prefix_reader(self, plan: BlendPlan):
        return prefix_reader(self.stack, lambda layer: self.c._kv_caches[self.names[layer]],
                             torch.tensor(plan.block_ids, dtype=torch.int32), plan.start,
                             "cacheblend: cannot read the cached prefix")

    def _write(self, plan: BlendPlan, keys: torch.Tensor, values: torch.Tensor) -> None:
        from vllm import _custom_ops as ops

        slots = self._slots(plan, torch.arange(plan.start, plan.end))
        KH, D = self.stack.num_kv_heads, self.stack.head_dim
        for layer, name in enumerate(self.names):
            cache = self.c._kv_caches[name]
            nb, heads, bs, _ = cache.shape
            key_cache, value_cache = cache.view(nb, heads, bs * 2, -1).chunk(2, dim=2)
            ops.cpu_attn_reshape_and_cache(keys[layer].view(-1, KH, D).contiguous(),
                                           values[layer].view(-1, KH, D).contiguous(), key_cache, value_cache,
                                           slots, self.stack.isa(layer), k_scale=1.0, v_scale=1.0,
                                           kv_cache_dtype="auto")
