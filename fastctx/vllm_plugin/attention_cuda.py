"""fastctx attention backend for vLLM on CUDA: FlashAttention's backend, with the prefill (and any
decode method) handed to fastctx's engine-neutral core. It translates metadata, nothing else.

vLLM puts decodes first (the builder asks for it); they run on vLLM's own FlashAttention kernel
over their sub-batch unless a decode method is configured. Prefill chunks go to the engine's
``AttentionRuntime`` with the layer's cache read in place through the block table
(``cuda_paged_kv``), where ``paged_attention`` runs fastctx's Triton kernel and the methods build
their indexes on the GPU. The batch layout comes from the host copies vLLM already keeps
(``query_start_loc_cpu``, ``seq_lens_cpu_upper_bound``, exact for prefill rows): no device-to-host
copy per layer.

CUDA graphs: a full graph replays FlashAttention alone, so full graphs are declared for batches of
single-token decodes, and only while decodes stay on FlashAttention; every batch with a prefill
runs its attention eagerly between vLLM's piecewise graphs. With a decode method: none.

Layers or batches it cannot translate (as on CPU, plus per-request causality, multimodal prefix
ranges and decode context parallelism) run FlashAttention as stock vLLM does; the reason is logged
once per layer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from vllm.v1.attention.backend import AttentionCGSupport
from vllm.v1.attention.backends.flash_attn import (
    FlashAttentionBackend,
    FlashAttentionImpl,
    FlashAttentionMetadata,
    FlashAttentionMetadataBuilder,
)

from fastctx.config import ENGINE, FastctxConfig
from fastctx.vllm_plugin.impl_base import FastctxImpl, HostLayout
from fastctx.vllm_plugin.paged_kv import cuda_paged_kv


class FastctxFlashAttentionBackend(FlashAttentionBackend):
    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_impl_cls():
        return FastctxFlashAttentionImpl

    @staticmethod
    def get_builder_cls():
        return FastctxFlashAttentionMetadataBuilder


@dataclass
class FastctxFlashAttentionMetadata(HostLayout, FlashAttentionMetadata):
    fallback: str | None = None  # why this batch runs on FlashAttention alone


def host_layout(common, decode_threshold: int) -> HostLayout:
    """The step's layout on the host from vLLM's ``CommonAttentionMetadata``; a device-to-host copy of
    the sequence lengths only where vLLM keeps no host bound."""
    n = common.num_reqs
    seq_lens = common.seq_lens_cpu_upper_bound
    seq_lens = seq_lens[:n] if seq_lens is not None else common.seq_lens[:n].cpu()
    return HostLayout.of(common.query_start_loc_cpu[:n + 1].tolist(), seq_lens.tolist(), decode_threshold)


def why_not_batch(meta: FlashAttentionMetadata) -> str | None:
    if meta.causal is not True:
        return "per-request or non-causal attention"
    if meta.mm_prefix_query_range_tensor is not None or meta.rswa_prefix_lens is not None:
        return "multimodal prefix or reference-sliding-window masks"
    return None


def decode_metadata(meta: FastctxFlashAttentionMetadata) -> FlashAttentionMetadata:
    """FlashAttention's metadata for the step's decode sub-batch (its first ``num_decodes`` requests).
    FlashAttention plans its own split-KV schedule for it (the step's ahead-of-time plan covers the
    whole batch)."""
    nd, qsl, seq_lens = meta.num_decodes, meta.query_start_loc_host, meta.seq_lens_host
    return dataclasses.replace(
        meta, num_actual_tokens=qsl[nd], max_query_len=max(b - a for a, b in zip(qsl[:nd], qsl[1:nd + 1])),
        query_start_loc=meta.query_start_loc[:nd + 1], max_seq_len=max(seq_lens[:nd]),
        seq_lens=meta.seq_lens[:nd], block_table=meta.block_table[:nd], slot_mapping=meta.slot_mapping[:qsl[nd]],
        scheduler_metadata=None, max_num_splits=0)


class FastctxFlashAttentionMetadataBuilder(FlashAttentionMetadataBuilder):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        # Decodes first (with speculative decoding: requests of up to 1 + k queries), so FlashAttention
        # and decode methods get a contiguous decode sub-batch.
        self._init_reorder_batch_threshold(1, supports_spec_as_decode=True)

    @classmethod
    def get_cudagraph_support(cls, vllm_config, kv_cache_spec) -> AttentionCGSupport:
        decode = FastctxConfig.from_additional_config(vllm_config.additional_config).decode
        return AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE if decode == ENGINE else AttentionCGSupport.NEVER

    def build(self, common_prefix_len, common_attn_metadata, fast_build=False):
        base = super().build(common_prefix_len, common_attn_metadata, fast_build)
        meta = FastctxFlashAttentionMetadata(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)})
        meta.fallback = why_not_batch(meta)
        if not meta.fallback:
            vars(meta).update(vars(host_layout(common_attn_metadata, self.reorder_batch_threshold or 1)))
        return meta


class FastctxFlashAttentionImpl(FastctxImpl, FlashAttentionImpl):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_fastctx()

    def paged_kv(self, kv_cache: torch.Tensor):
        return cuda_paged_kv(kv_cache)

    def why_not_cache(self, kv_cache: torch.Tensor, layer) -> str | None:
        if kv_cache.dim() != 4 or kv_cache.stride(3) != 1 or kv_cache.shape[3] != 2 * self.head_size:
            return f"unexpected KV cache shape/strides {tuple(kv_cache.shape)}/{kv_cache.stride()}"
        return None

    def engine_decodes(self, layer, query, key, value, kv_cache, meta, output) -> None:
        FlashAttentionImpl.forward(self, layer, query, key, value, kv_cache, decode_metadata(meta), output)
