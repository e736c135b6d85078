"""fastctx attention backend for vLLM's CPU engine.

It wraps vLLM's ``CPU_ATTN``: decode tokens keep the stock paged kernel;
every prefill request (a fresh prompt, a later chunk of a chunked prefill, or
the remainder after a prefix-cache hit) is computed by the selected fastctx
method over K/V read back from the paged cache. Cases this adapter does not
translate (sliding window, ALiBi, soft-cap, sinks, fp8 KV, non-decoder
attention, non-``vec`` cache layouts) stay entirely on the stock kernel.
"""

from __future__ import annotations

import re
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

from fastctx.config import FastctxConfig
from fastctx.methods import DensityStats, PrefillMethod, build_prefill_method
from fastctx.vllm_plugin.paged_kv import gather_context_kv

# Under the "vllm" logger tree so messages follow vLLM's own log config.
logger = init_logger("vllm.fastctx." + __name__.rsplit(".", 1)[-1])

# Layouts whose K/V blocks gather_context_kv can read (K transposed per block).
_READABLE_ISAS = ("vec", "vec16")


@dataclass
class StepStats:
    """What the backend computed, counted once per engine step (not per layer)."""

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


class FastctxCPUAttentionMetadataBuilder(CPUAttentionMetadataBuilder):
    # Requests with one query token (decodes) are put first in the batch, so
    # the stock kernel gets a contiguous decode sub-batch.
    reorder_batch_threshold = 1

    def build(self, common_prefix_len, common_attn_metadata, fast_build=False):
        base = super().build(common_prefix_len, common_attn_metadata, fast_build)
        meta = FastctxCPUAttentionMetadata(**vars(base))
        if not self._translatable(meta):
            return meta
        qsl = common_attn_metadata.query_start_loc_cpu.tolist()
        seq_lens = meta.seq_lens.tolist()
        query_lens = [b - a for a, b in zip(qsl, qsl[1:])]
        nd = 0
        while nd < len(query_lens) and query_lens[nd] == 1:
            nd += 1
        meta.num_decodes, meta.num_decode_tokens = nd, qsl[nd]
        meta.query_start_loc_host, meta.seq_lens_host = qsl, seq_lens
        if 0 < nd < len(query_lens):
            # The stock work partition covers the whole batch; the decode
            # sub-batch needs its own.
            meta.decode_scheduler_metadata = ops.cpu_attn_get_scheduler_metadata(
                num_reqs=nd, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                head_dim=self.head_dim, seq_lens=meta.seq_lens[:nd], dtype=self.dtype,
                query_start_loc=meta.query_start_loc[:nd + 1], causal=True,
                sliding_window_size=self.window_size, isa=self.isa,
                enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV, dynamic_causal=None,
                kv_cache_dtype=self.kv_cache_dtype)
        self._count(query_lens[nd:], seq_lens[nd:], qsl[nd])
        return meta

    def _translatable(self, meta) -> bool:
        return (meta.causal is True and meta.dynamic_causal is None
                and meta.encoder_cache is None and self.isa in _READABLE_ISAS
                and self.window_size == -1 and self.kv_cache_dtype == "auto")

    @staticmethod
    def _count(prefill_q_lens, prefill_seq_lens, decode_tokens) -> None:
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
                "fastctx's attention backend runs on vLLM's CPU engine only in this release; "
                "drop --attention-backend CUSTOM on GPU until its Triton kernels land")
        super().__init__(*args, **kwargs)
        from fastctx.vllm_plugin.platform import validate

        vllm_config = get_current_vllm_config()
        self.fastctx_config = validate(vllm_config)
        self.prefill = prefill_method(vllm_config, self.fastctx_config)
        self.layer_index: int | None = None
        self.translatable = (
            self.attn_type == AttentionType.DECODER and self.alibi_slopes is None
            and self.sliding_window == -1 and not self.logits_soft_cap
            and self.sinks is None and not self.is_fp8_kv_cache
            and self.kv_sharing_target_layer_name is None)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        meta = attn_metadata
        if (meta is None or output_scale is not None or output_block_scale is not None
                or not self.translatable or getattr(meta, "query_start_loc_host", None) is None
                or getattr(layer, "isa", None) not in _READABLE_ISAS
                or meta.num_decodes == len(meta.seq_lens_host)):
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                                   output_scale, output_block_scale)
        nb, hkv, bs, _ = kv_cache.shape
        key_cache, value_cache = kv_cache.view(nb, hkv, 2 * bs, -1).chunk(2, dim=2)
        nd, ndt = meta.num_decodes, meta.num_decode_tokens
        if nd:
            ops.cpu_attention_with_kv_cache(
                query=query[:ndt], key_cache=key_cache, value_cache=value_cache,
                output=output[:ndt], query_start_loc=meta.query_start_loc[:nd + 1],
                seq_lens=meta.seq_lens[:nd], scale=self.scale, causal=True,
                alibi_slopes=None, sliding_window=-1, block_table=meta.block_table[:nd],
                softcap=0, scheduler_metadata=meta.decode_scheduler_metadata, s_aux=None,
                dynamic_causal=None, k_scale=layer._k_scale_float,
                v_scale=layer._v_scale_float, kv_cache_dtype=self.kv_cache_dtype)
        if self.layer_index is None:
            self.layer_index = _layer_number(layer.layer_name)
        qsl, seq_lens = meta.query_start_loc_host, meta.seq_lens_host
        out_view = output.view(output.shape[0], self.num_heads, self.head_size)
        for i in range(nd, len(seq_lens)):
            start, end = qsl[i], qsl[i + 1]
            context = seq_lens[i] - (end - start)
            k_prefix = v_prefix = None
            if context:
                k_prefix, v_prefix = gather_context_kv(
                    key_cache, value_cache, meta.block_table[i], context)
            out = self.prefill(
                query[start:end].transpose(0, 1), key[start:end].transpose(0, 1),
                value[start:end].transpose(0, 1), k_prefix, v_prefix, scale=self.scale,
                layer=self.layer_index)
            out_view[start:end].copy_(out.transpose(0, 1))
        return output


# One prefill method per distinct fastctx config in this process, shared by
# every layer of an engine (so its density counts cover the whole model).
_METHODS: dict[FastctxConfig, PrefillMethod] = {}


def prefill_method(vllm_config, cfg: FastctxConfig) -> PrefillMethod:
    if cfg not in _METHODS:
        model = vllm_config.model_config
        _METHODS[cfg] = build_prefill_method(cfg, model.get_num_layers(vllm_config.parallel_config),
                                             model.get_num_attention_heads(vllm_config.parallel_config))
        logger.info("fastctx attention: prefill method %r, config %s", cfg.attention, cfg.as_dict())
    return _METHODS[cfg]


def density_stats(reset: bool = False) -> list[dict]:
    """Achieved attention density of each prefill method in this process so far."""
    stats = [{"method": m.name, "config": cfg.as_dict(), **m.stats.as_dict()} for cfg, m in _METHODS.items()]
    if reset:
        for method in _METHODS.values():
            method.stats = DensityStats()
    return stats


def _layer_number(layer_name: str) -> int:
    match = re.search(r"\.(\d+)\.", layer_name)
    if match is None:
        raise ValueError(f"fastctx: cannot find the layer number in attention layer name {layer_name!r}")
    return int(match.group(1))
