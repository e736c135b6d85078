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

from dataclasses import dataclass

import torch
from vllm import _custom_ops as ops
from vllm import envs
from vllm.logger import init_logger
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)

from fastctx.vllm_plugin.impl_base import FastctxImpl, HostLayout
from fastctx.vllm_plugin.paged_kv import READABLE_ISAS, cpu_paged_kv, why_not_readable

# Under the "vllm" logger tree so messages follow vLLM's own log config.
logger = init_logger("vllm.fastctx." + __name__.rsplit(".", 1)[-1])


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
class FastctxCPUAttentionMetadata(HostLayout, CPUAttentionMetadata):
    decode_scheduler_metadata: torch.Tensor | None = None
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
        layout = HostLayout.of(common_attn_metadata.query_start_loc_cpu.tolist(), meta.seq_lens.tolist(),
                               self.reorder_batch_threshold or 1)
        vars(meta).update(vars(layout))
        nd = layout.num_decodes
        meta.num_decode_tokens = layout.query_start_loc_host[nd]
        if 0 < nd < len(layout.seq_lens_host):
            # The stock work partition covers the whole batch; the decode sub-batch needs its own.
            meta.decode_scheduler_metadata = ops.cpu_attn_get_scheduler_metadata(
                num_reqs=nd, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                head_dim=self.head_dim, seq_lens=meta.seq_lens[:nd], dtype=self.dtype,
                query_start_loc=meta.query_start_loc[:nd + 1], causal=True,
                sliding_window_size=self.window_size, isa=self.isa,
                enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV, dynamic_causal=None,
                kv_cache_dtype=self.kv_cache_dtype)
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


class FastctxCPUAttentionImpl(FastctxImpl, CPUAttentionBackendImpl):
    def __init__(self, *args, **kwargs) -> None:
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            raise NotImplementedError(f"fastctx's vLLM attention runs on vLLM's CPU and CUDA platforms, not on "
                                      f"{current_platform.device_name!r}: drop --attention-backend CUSTOM here")
        super().__init__(*args, **kwargs)
        self._init_fastctx()

    def paged_kv(self, kv_cache):
        return cpu_paged_kv(kv_cache)

    def why_not_cache(self, kv_cache, layer) -> str | None:
        return why_not_readable(kv_cache, getattr(layer, "isa", None))

    def engine_decodes(self, layer, query, key, value, kv_cache, meta, output) -> None:
        nb, hkv, bs, _ = kv_cache.shape
        key_cache, value_cache = kv_cache.view(nb, hkv, 2 * bs, -1).chunk(2, dim=2)
        nd, ndt = meta.num_decodes, meta.query_start_loc_host[meta.num_decodes]
        ops.cpu_attention_with_kv_cache(
            query=query[:ndt], key_cache=key_cache, value_cache=value_cache,
            output=output[:ndt], query_start_loc=meta.query_start_loc[:nd + 1],
            seq_lens=meta.seq_lens[:nd], scale=self.scale, causal=True,
            alibi_slopes=None, sliding_window=-1, block_table=meta.block_table[:nd],
            softcap=0, scheduler_metadata=meta.decode_scheduler_metadata, s_aux=None,
            dynamic_causal=None, k_scale=layer._k_scale_float,
            v_scale=layer._v_scale_float, kv_cache_dtype=self.kv_cache_dtype)
