"""fastctx attention backend for vLLM's CPU engine: translates metadata, nothing else.

It wraps vLLM's ``CPU_ATTN``. Each step the builder adds the host copies of the
batch layout and the decode/prefill split (vLLM puts decodes first); each layer's
forward turns that into a ``fastctx.core.StepBatch`` and hands it to the engine's
``AttentionRuntime`` (bound by fastctx's worker), which runs the configured
prefill and decode methods over K/V read in place from vLLM's paged cache.
Decodes stay on vLLM's kernel unless a decode method is configured.

Layers or batches this adapter cannot translate (sliding window, ALiBi,
soft-cap, sinks, fp8 KV, non-decoder attention, fused output quantization)
run vLLM's own kernel; the reason is logged once per layer.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch
from vllm import _custom_ops as ops
from vllm import envs
from vllm.config import get_current_vllm_config
from vllm.logger import init_logger
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)

from fastctx.core import AttentionRuntime, StepBatch, count_decodes
from fastctx.methods import ModelShape
from fastctx.vllm_plugin.paged_kv import READABLE_ISAS, cpu_paged_kv, why_not_readable

# Under the "vllm" logger tree so messages follow vLLM's own log config.
logger = init_logger("vllm.fastctx." + __name__.rsplit(".", 1)[-1])


@dataclass
class StepStats:
    """What the backend saw, counted once per engine step (not per layer)."""

    steps: int = 0
    decode_tokens: int = 0
    prefill_requests: int = 0
    prefill_tokens: int = 0
    prefix_prefills: int = 0  # prefill requests that attend to cached context
    mixed_steps: int = 0  # steps holding both decodes and prefills
    # (decode tokens, [(query_len, seq_len) per prefill]) of the latest steps;
    # bounded because a server runs for days.
    history: deque = field(default_factory=lambda: deque(maxlen=4096))

    def reset(self) -> None:
        self.__init__()


STATS = StepStats()


class FastctxCPUAttentionBackend(CPUAttentionBackend):
    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_impl_cls():
        return FastctxCPUAttentionImpl

    @staticmethod
    def get_builder_cls():
        return FastctxCPUAttentionMetadataBuilder


@dataclass
class FastctxCPUAttentionMetadata(CPUAttentionMetadata):
    # num_decode_tokens is inherited from CPUAttentionMetadata.
    num_decodes: int = 0
    decode_scheduler_metadata: torch.Tensor | None = None
    query_start_loc_host: list[int] | None = None
    seq_lens_host: list[int] | None = None
    fallback: str | None = None  # why this batch runs on vLLM's kernel


class FastctxCPUAttentionMetadataBuilder(CPUAttentionMetadataBuilder):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        # Decodes first (with speculative decoding: requests of up to 1 + k queries), so the
        # engine's kernel and decode methods get a contiguous decode sub-batch.
        self._init_reorder_batch_threshold(1, supports_spec_as_decode=True)
        keep_vec_layout(self, layer_names)

    def build(self, common_prefix_len, common_attn_metadata, fast_build=False):
        base = super().build(common_prefix_len, common_attn_metadata, fast_build)
        meta = FastctxCPUAttentionMetadata(**vars(base))
        meta.fallback = self._why_not(meta)
        if meta.fallback:
            return meta
        qsl = common_attn_metadata.query_start_loc_cpu.tolist()
        seq_lens = meta.seq_lens.tolist()
        query_lens = [b - a for a, b in zip(qsl, qsl[1:])]
        nd = count_decodes(query_lens, self.reorder_batch_threshold or 1)
        meta.num_decodes, meta.num_decode_tokens = nd, qsl[nd]
        meta.query_start_loc_host, meta.seq_lens_host = qsl, seq_lens
        if 0 < nd < len(query_lens):
            # The stock work partition covers the whole batch; the decode sub-batch needs its own.
            meta.decode_scheduler_metadata = ops.cpu_attn_get_scheduler_metadata(
                num_reqs=nd, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                head_dim=self.head_dim, seq_lens=meta.seq_lens[:nd], dtype=self.dtype,
                query_start_loc=meta.query_start_loc[:nd + 1], causal=True,
                sliding_window_size=self.window_size, isa=self.isa,
                enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV, dynamic_causal=None,
                kv_cache_dtype=self.kv_cache_dtype)
        _count_step(query_lens[nd:], seq_lens[nd:], qsl[nd])
        return meta

    def _why_not(self, meta) -> str | None:
        if meta.causal is not True or meta.dynamic_causal is not None or meta.encoder_cache is not None:
            return "non-causal or encoder attention"
        if self.isa not in READABLE_ISAS:
            return f"KV cache layout of ISA {self.isa!r} is not readable in place"
        if self.window_size != -1:
            return "sliding-window layers"
        if self.kv_cache_dtype != "auto":
            return f"kv_cache_dtype {self.kv_cache_dtype}"
        return None


def keep_vec_layout(builder: CPUAttentionMetadataBuilder, layer_names) -> None:
    """On AMX hosts vLLM pre-packs K/V tiles in a layout fastctx does not read; vLLM's "vec" layout holds
    bf16 as well, and its kernels read it: use that one."""
    if builder.isa not in READABLE_ISAS and builder.isa == "amx" and builder.block_size % 32 == 0:
        logger.info_once("fastctx: KV cache in vLLM's 'vec' layout instead of 'amx' (readable in place)")
        builder.isa = "vec"
        builder._set_isa_to_layers(layer_names)


def _count_step(prefill_q_lens, prefill_seq_lens, decode_tokens) -> None:
    STATS.steps += 1
    STATS.decode_tokens += decode_tokens
    STATS.prefill_requests += len(prefill_q_lens)
    STATS.prefill_tokens += sum(prefill_q_lens)
    STATS.prefix_prefills += sum(s > q for q, s in zip(prefill_q_lens, prefill_seq_lens))
    STATS.mixed_steps += bool(decode_tokens and prefill_q_lens)
    STATS.history.append((decode_tokens, list(zip(prefill_q_lens, prefill_seq_lens))))


class FastctxCPUAttentionImpl(CPUAttentionBackendImpl):
    def __init__(self, *args, **kwargs) -> None:
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            raise NotImplementedError(
                "fastctx's vLLM attention backend runs on vLLM's CPU engine only in this release; "
                "drop --attention-backend CUSTOM on GPU")
        super().__init__(*args, **kwargs)
        from fastctx.vllm_plugin.platform import validate

        self.fastctx_config = validate(get_current_vllm_config())
        self.runtime: AttentionRuntime | None = None  # bound by fastctx's worker after the model loads
        self.layer_index = -1
        self.layer_name = ""
        self._request_ids = None
        self._logged = False
        self.fallback = self._why_not_layer()

    def _why_not_layer(self) -> str | None:
        if self.attn_type != AttentionType.DECODER:
            return f"{self.attn_type} attention"
        for what, present in (("ALiBi", self.alibi_slopes is not None),
                              ("sliding window", self.sliding_window != -1),
                              ("logit soft-cap", bool(self.logits_soft_cap)),
                              ("attention sinks", self.sinks is not None),
                              ("fp8 KV cache", self.is_fp8_kv_cache)):
            if present:
                return f"{what} is not translated"
        return None

    def bind(self, runtime: AttentionRuntime, layer_index: int, layer_name: str, request_ids) -> None:
        """Called by fastctx's worker: the engine's runtime, this layer's place among the engine's
        attention layers, and a callable giving the batch's request ids (or None)."""
        self.runtime, self.layer_index = runtime, layer_index
        self.layer_name, self._request_ids = layer_name, request_ids

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        meta = attn_metadata
        if meta is None:  # warm-up
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                                   output_scale, output_block_scale)
        why = (self.fallback or getattr(meta, "fallback", "metadata from another backend")
               or ("fused output quantization" if output_scale is not None or output_block_scale is not None else None)
               or ("not bound to a fastctx runtime (fastctx's worker did not load this model)" if self.runtime is None
                   else None)
               or why_not_readable(kv_cache, getattr(layer, "isa", None)))
        if why:
            if not self._logged:
                logger.warning("fastctx: layer %s runs vLLM's attention kernel: %s", layer.layer_name, why)
                self._logged = True
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                                   output_scale, output_block_scale)
        nd, seq_lens = meta.num_decodes, meta.seq_lens_host
        runtime = self.runtime
        if runtime.engine_decodes and nd == len(seq_lens):  # a decode-only step: nothing for fastctx
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                                   output_scale, output_block_scale)
        if runtime.engine_decodes and nd:
            self._engine_decodes(layer, query, kv_cache, meta, output)
        n = meta.num_actual_tokens
        batch = StepBatch(query=query[:n], kv=cpu_paged_kv(kv_cache), block_table=meta.block_table,
                          query_start=meta.query_start_loc_host, seq_lens=seq_lens, num_decodes=nd,
                          request_ids=self._request_ids(len(seq_lens)))
        runtime.forward(batch, self.layer_index, self.scale, output[:n].view(n, self.num_heads, self.head_size))
        return output

    def _engine_decodes(self, layer, query, kv_cache, meta, output) -> None:
        nb, hkv, bs, _ = kv_cache.shape
        key_cache, value_cache = kv_cache.view(nb, hkv, 2 * bs, -1).chunk(2, dim=2)
        nd, ndt = meta.num_decodes, meta.num_decode_tokens
        ops.cpu_attention_with_kv_cache(
            query=query[:ndt], key_cache=key_cache, value_cache=value_cache,
            output=output[:ndt], query_start_loc=meta.query_start_loc[:nd + 1],
            seq_lens=meta.seq_lens[:nd], scale=self.scale, causal=True,
            alibi_slopes=None, sliding_window=-1, block_table=meta.block_table[:nd],
            softcap=0, scheduler_metadata=meta.decode_scheduler_metadata, s_aux=None,
            dynamic_causal=None, k_scale=layer._k_scale_float,
            v_scale=layer._v_scale_float, kv_cache_dtype=self.kv_cache_dtype)


def bind_attention_layers(vllm_config, model_runner) -> AttentionRuntime | None:
    """Give every fastctx attention layer of an engine its runtime and its index among the engine's
    attention layers (in model order, so hybrid models count only attention). Fails when every
    layer would fall back to vLLM's kernel, naming why."""
    layers = [(name, layer) for name, layer in vllm_config.compilation_config.static_forward_context.items()
              if isinstance(getattr(layer, "impl", None), FastctxCPUAttentionImpl)]
    if not layers:
        return None
    first = layers[0][1].impl
    shape = ModelShape(num_layers=len(layers), num_heads=first.num_heads, num_kv_heads=first.num_kv_heads,
                       head_dim=first.head_size)
    runtime = AttentionRuntime(first.fastctx_config, shape)

    def request_ids(num_reqs: int) -> list[str] | None:
        ids = model_runner.input_batch.req_ids
        return list(ids[:num_reqs]) if len(ids) >= num_reqs else None

    for index, (name, layer) in enumerate(layers):
        layer.impl.bind(runtime, index, name, request_ids)
    reasons = {name: layer.impl.fallback for name, layer in layers if layer.impl.fallback}
    if len(reasons) == len(layers):
        raise RuntimeError("fastctx: every attention layer would run vLLM's own kernel, so the fastctx config "
                           "would do nothing: " + "; ".join(f"{n}: {why}" for n, why in reasons.items()))
    logger.info("fastctx attention: %d layers, prefill %r, decode %r, config %s", len(layers),
                runtime.config.attention, runtime.config.decode, runtime.config.as_dict())
    return runtime
