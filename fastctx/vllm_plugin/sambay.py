"""SambaY (``Phi4FlashForCausalLM``) on vLLM V1: vLLM's cache managers, fastctx's layer math.

What vLLM provides, unpatched: the Mamba state slots (``MambaBase`` layers,
Mamba-1 metadata), sliding-window KV for the self-decoder's attention, one full
KV cache written by layer L/2+1 and read by every cross-attention layer
(``kv_sharing_target_layer_name``, so the cross-decoder adds no KV bytes), and
``--kv-sharing-fast-prefill``, with which prompt tokens skip the cross-decoder
(only the tokens that are sampled run it; prompt logprobs are then wrong, as
vLLM warns for every model with that flag).

What fastctx supplies, because vLLM 0.32's CPU build lacks it: the Mamba-1
conv/scan for prefill chunks and decode steps (``fastctx.kernels.mamba``; the
CPU wheel has no ``selective_scan_fwd`` and its state-update kernel assumes
Mamba-2), and differential attention: vLLM's own CPU attention kernel over
head-sliced views of its paged cache, combined by
``fastctx.kernels.diff_attention.combine``. The model runs eagerly (it is not
decorated for torch.compile).

Refused with a message: prefix caching (a Mamba state cannot be resumed from a
cached prefix without vLLM's "align" checkpoints, which this port does not
write), speculative decoding, tensor/pipeline parallelism.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from vllm import _custom_ops as ops
from vllm import envs
from vllm.config import VllmConfig, get_current_vllm_config
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.linear import ReplicatedLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.mamba.abstract import MambaBase
from vllm.model_executor.layers.mamba.mamba_utils import (
    MambaStateCopyFuncCalculator,
    MambaStateDtypeCalculator,
    MambaStateShapeCalculator,
    is_conv_state_dim_first,
)
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import HasInnerState, IsHybrid
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadataBuilder,
)
from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum

from fastctx.core import AttentionRuntime, StepBatch, count_decodes
from fastctx.kernels.attention import Read, paged_attention
from fastctx.kernels.diff_attention import combine, pair_major
from fastctx.kernels.mamba import causal_conv1d, causal_conv1d_step, selective_scan, selective_scan_step
from fastctx.kernels.paged import PagedKV
from fastctx.methods import ModelShape
from fastctx.models.sambay.config import CROSS, GMU, MAMBA, SLIDING, Phi4FlashConfig, layer_kinds
from fastctx.models.sambay.reference import DiffAttentionParams, Gmu, Mlp
from fastctx.vllm_plugin.attention import keep_vec_layout
from fastctx.vllm_plugin.paged_kv import READABLE_ISAS, cpu_paged_kv


def unsupported(vllm_config: VllmConfig) -> str | None:
    """Why this engine configuration cannot serve SambaY, with what to change, or None."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return "fastctx's SambaY port runs on vLLM's CPU engine in this release"
    if vllm_config.cache_config.enable_prefix_caching:
        return ("prefix caching is not supported for SambaY: its Mamba layers' state at a cached prefix is not "
                "stored (vLLM's 'align' Mamba checkpoints are not written by this port); pass "
                "--no-enable-prefix-caching")
    if vllm_config.speculative_config is not None:
        return "speculative decoding is not supported for SambaY; drop --speculative-config"
    head_dim = vllm_config.model_config.hf_config.head_dim
    if head_dim not in CPUAttentionBackend.get_supported_head_sizes():
        return (f"head_dim {head_dim} (hidden_size / num_attention_heads) is not one vLLM's CPU attention "
                f"supports: {CPUAttentionBackend.get_supported_head_sizes()}")
    parallel = vllm_config.parallel_config
    if parallel.tensor_parallel_size != 1 or parallel.pipeline_parallel_size != 1:
        return "SambaY runs without tensor or pipeline parallelism; use -tp 1 -pp 1"
    return None


class Linear(ReplicatedLinear):
    """vLLM's linear layer (oneDNN GEMMs on CPU), returning only the output."""

    def __init__(self, input_size: int, output_size: int, bias: bool):
        super().__init__(input_size, output_size, bias=bias)

    def forward(self, x):
        return super().forward(x)[0]


class SambaYMamba(MambaBase, nn.Module):
    """Mamba-1 mixer over vLLM's Mamba state slots; also returns the pre-gate scan output."""

    def __init__(self, config: Phi4FlashConfig, prefix: str):
        nn.Module.__init__(self)
        inner, n, width = config.mamba_inner, config.mamba_d_state, config.mamba_d_conv
        self.inner, self.d_state, self.conv_width, self.dt_rank = inner, n, width, config.mamba_dt_rank
        self.in_proj = Linear(config.hidden_size, 2 * inner, bias=config.mamba_proj_bias)
        self.conv1d = nn.Module()
        self.conv1d.weight = nn.Parameter(torch.empty(inner, 1, width))
        self.conv1d.bias = nn.Parameter(torch.empty(inner)) if config.mamba_conv_bias else None
        self.x_proj = Linear(inner, self.dt_rank + 2 * n, bias=False)
        self.dt_proj = Linear(self.dt_rank, inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(inner, n, dtype=torch.float32))
        self.D = nn.Parameter(torch.empty(inner))
        self.out_proj = Linear(inner, config.hidden_size, bias=config.mamba_proj_bias)
        vllm_config = get_current_vllm_config()
        self.model_config, self.cache_config = vllm_config.model_config, vllm_config.cache_config
        context = vllm_config.compilation_config.static_forward_context
        if prefix in context:
            raise ValueError(f"Duplicate layer name: {prefix}")
        context[prefix] = self
        self.prefix = prefix
        self.kv_cache = (torch.tensor([]), torch.tensor([]))

    @property
    def mamba_type(self) -> MambaAttentionBackendEnum:
        return MambaAttentionBackendEnum.MAMBA1

    def get_state_shape(self):
        return MambaStateShapeCalculator.mamba1_state_shape(tp_world_size=1, intermediate_size=self.inner,
                                                            state_size=self.d_state, conv_kernel=self.conv_width)

    def get_state_dtype(self):
        return MambaStateDtypeCalculator.mamba1_state_dtype(self.model_config.dtype,
                                                            self.cache_config.mamba_cache_dtype,
                                                            self.cache_config.mamba_ssm_cache_dtype)

    def _ssm_inputs(self, xs):
        dt, B, C = self.x_proj(xs).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        return F.softplus(self.dt_proj(dt)), B, C

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xs, z = self.in_proj(x).chunk(2, dim=-1)
        meta = get_forward_context().attn_metadata
        meta = meta.get(self.prefix) if isinstance(meta, dict) else None
        y = torch.zeros_like(xs)
        if meta is not None:
            self._mix(xs, meta, y)
        return self.out_proj(y * F.silu(z)), y

    def _mix(self, xs: torch.Tensor, meta, y: torch.Tensor) -> None:
        conv_state = self.kv_cache[0] if is_conv_state_dim_first() else self.kv_cache[0].transpose(-1, -2)
        ssm_state = self.kv_cache[1]
        weight, bias = self.conv1d.weight[:, 0], self.conv1d.bias
        A = -torch.exp(self.A_log.float())
        nd = meta.num_decode_tokens
        if nd:
            slots = meta.state_indices_tensor_d[:, 0].long()
            conv_out, conv_state[slots] = causal_conv1d_step(xs[:nd], weight, bias, conv_state[slots])
            delta, B, C = self._ssm_inputs(conv_out)
            y[:nd], new = selective_scan_step(conv_out, delta, A, B, C, self.D, ssm_state[slots])
            ssm_state[slots] = new.to(ssm_state.dtype)
        if meta.num_prefills:
            starts = (meta.query_start_loc_p + nd).tolist()
            slots = meta.state_indices_tensor_p.tolist()
            resume = meta.has_initial_states_p.tolist()
            for a, b, slot, has_state in zip(starts, starts[1:], slots, resume):
                conv_out, new_conv = causal_conv1d(xs[a:b], weight, bias, conv_state[slot] if has_state else None)
                delta, B, C = self._ssm_inputs(conv_out)
                y[a:b], h = selective_scan(conv_out, delta, A, B, C, self.D, ssm_state[slot] if has_state else None)
                conv_state[slot], ssm_state[slot] = new_conv, h.to(ssm_state.dtype)


class DifferentialCPUAttentionBackend(CPUAttentionBackend):
    """vLLM's CPU attention (cache layout, metadata, KV writes, kernel) computing differential attention."""

    @staticmethod
    def get_impl_cls():
        return DifferentialCPUAttentionImpl

    @staticmethod
    def get_builder_cls():
        return DifferentialCPUAttentionMetadataBuilder


class DifferentialCPUAttentionMetadataBuilder(CPUAttentionMetadataBuilder):
    """Adds the kernel's work partition for half the heads: each map attends with H/2 query heads over
    Hkv/2 KV heads."""

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        keep_vec_layout(self, layer_names)

    def build(self, common_prefix_len, common_attn_metadata, fast_build=False):
        meta = super().build(common_prefix_len, common_attn_metadata, fast_build)
        meta.scheduler_metadata = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=meta.seq_lens.shape[0], num_heads=self.num_heads // 2, num_kv_heads=self.num_kv_heads // 2,
            head_dim=self.head_dim, seq_lens=meta.seq_lens, dtype=self.dtype, query_start_loc=meta.query_start_loc,
            causal=True, sliding_window_size=self.window_size, isa=self.isa,
            enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV, dynamic_causal=None, kv_cache_dtype=self.kv_cache_dtype)
        return meta


class DifferentialCPUAttentionImpl(CPUAttentionBackendImpl):
    """Queries, keys and values arrive pair-major (``pair_major``), so the first and second halves of the
    cache's heads are the pairs' first and second keys: the four maps are vLLM's own kernel over
    head-sliced views of the paged cache."""

    def __init__(self, *args, differential: DiffAttentionParams, **kwargs):
        super().__init__(*args, **kwargs)
        self.differential = differential
        self.runtime: AttentionRuntime | None = None  # bound by fastctx's worker (full-attention layer only)
        self._request_ids = None

    def bind(self, runtime: AttentionRuntime, request_ids) -> None:
        self.runtime, self._request_ids = runtime, request_ids

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        meta = attn_metadata
        if meta is None:  # profiling run
            return output
        if getattr(layer, "isa", None) not in READABLE_ISAS:
            raise RuntimeError(f"SambaY's differential attention slices vLLM's CPU KV cache by head, which the "
                               f"{layer.isa!r} layout does not allow")
        n = meta.num_actual_tokens
        blocks, kv_heads, block_size, _ = kv_cache.shape
        half, kv_half = self.num_heads // 2, kv_heads // 2
        if self.runtime is not None and (meta.max_query_len > 1 or not self.runtime.engine_decodes):
            maps = self._methods_maps(query[:n], cpu_paged_kv(kv_cache), meta, half, kv_half)
        else:
            key_cache, value_cache = kv_cache.view(blocks, kv_heads, 2 * block_size, -1).chunk(2, dim=2)
            maps = []
            for which in (0, 1):
                q = query[:n, which * half:(which + 1) * half]
                keys = key_cache[:, which * kv_half:(which + 1) * kv_half]
                outs = [self._attend(layer, q, keys, value_cache[:, v * kv_half:(v + 1) * kv_half], meta)
                        for v in (0, 1)]
                maps.append(torch.cat(outs, dim=-1))
        params = self.differential
        output[:n] = combine(maps[0], maps[1], lam=params.lam(), init=params.init, norm_weight=params.subln.weight)
        return output

    def _methods_maps(self, query, kv: PagedKV, meta, half: int, kv_half: int) -> list[torch.Tensor]:
        """Both maps through fastctx's runtime: each map is one of the runtime's two layers (H/2 query heads
        over Hkv/2 KV heads); the method picks what each map reads once, for both value halves. Decodes left
        to the engine read densely here."""
        qsl, seq_lens = meta.query_start_loc.tolist(), meta.seq_lens.tolist()
        nd = count_decodes([b - a for a, b in zip(qsl, qsl[1:])], 1)
        ids = self._request_ids(len(seq_lens))
        heads = lambda t, which: t[:, which * kv_half:(which + 1) * kv_half]  # noqa: E731
        maps = []
        for which in (0, 1):
            q = query[:, which * half:(which + 1) * half].contiguous()
            keys = heads(kv.key, which)
            batch = StepBatch(query=q, kv=PagedKV(keys, keys), block_table=meta.block_table, query_start=qsl,
                              seq_lens=seq_lens, num_decodes=nd, request_ids=ids)
            reads = [Read.DENSE if r.kind == "skip" else r for r in self.runtime.decode_reads(batch, which, self.scale)]
            reads += self.runtime.prefill_reads(batch, which, self.scale)
            maps.append(torch.cat([paged_attention(q, PagedKV(keys, heads(kv.value, v)), meta.block_table, qsl,
                                                   seq_lens, reads, scale=self.scale) for v in (0, 1)], dim=-1))
        return maps

    def _attend(self, layer, query, key_cache, value_cache, meta) -> torch.Tensor:
        out = torch.empty_like(query)
        ops.cpu_attention_with_kv_cache(
            query=query, key_cache=key_cache, value_cache=value_cache, output=out,
            query_start_loc=meta.query_start_loc, seq_lens=meta.seq_lens, scale=self.scale, causal=True,
            alibi_slopes=None, sliding_window=self.sliding_window, block_table=meta.block_table, softcap=0,
            scheduler_metadata=meta.scheduler_metadata, s_aux=None, dynamic_causal=None,
            k_scale=layer._k_scale_float, v_scale=layer._v_scale_float, kv_cache_dtype=self.kv_cache_dtype)
        return out


class SambaYAttention(nn.Module):
    def __init__(self, config: Phi4FlashConfig, layer_index: int, kind: str, prefix: str):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                    config.head_dim)
        self.kind = kind
        width = self.heads * self.head_dim + (0 if kind == CROSS else 2 * self.kv_heads * self.head_dim)
        self.Wqkv = Linear(config.hidden_size, width, bias=True)
        self.out_proj = Linear(self.heads * self.head_dim, config.hidden_size, bias=True)
        self.inner_cross_attn = DiffAttentionParams(self.head_dim, layer_index)
        shared = f"model.layers.{config.kv_layer}.attn.attn" if kind == CROSS else None
        self.attn = Attention(self.heads, self.head_dim, self.head_dim ** -0.5, num_kv_heads=self.kv_heads,
                              cache_config=get_current_vllm_config().cache_config,
                              per_layer_sliding_window=config.sliding_window if kind == SLIDING else None,
                              prefix=f"{prefix}.attn", kv_sharing_target_layer_name=shared,
                              attn_backend=DifferentialCPUAttentionBackend, differential=self.inner_cross_attn)

    def forward(self, x):
        t = x.shape[0]
        proj = self.Wqkv(x)
        q_width = self.heads * self.head_dim
        q = pair_major(proj[:, :q_width].view(t, self.heads, self.head_dim))
        if self.kind == CROSS:
            return self.out_proj(self.attn(q, None, None))
        k, v = (pair_major(part.view(t, self.kv_heads, self.head_dim))
                for part in proj[:, q_width:].split(self.kv_heads * self.head_dim, dim=-1))
        return self.out_proj(self.attn(q, k, v))


class DecoderLayer(nn.Module):
    def __init__(self, config: Phi4FlashConfig, index: int, kind: str, prefix: str):
        super().__init__()
        self.kind = kind
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = Mlp(config, Linear)
        if kind == MAMBA:
            self.attn = SambaYMamba(config, prefix=f"{prefix}.attn")
        elif kind == GMU:
            self.attn = Gmu(config, Linear)
        else:
            self.attn = SambaYAttention(config, index, kind, prefix=f"{prefix}.attn")


class SambaYModel(nn.Module):
    def __init__(self, config: Phi4FlashConfig, prefix: str):
        super().__init__()
        self.config = config
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i, kind, f"{prefix}.layers.{i}")
                                    for i, kind in enumerate(layer_kinds(config)))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids, inputs_embeds=None):
        cfg = self.config
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        memory = self_decoder = picked = None
        for i, layer in enumerate(self.layers):
            if i == cfg.kv_layer + 1:
                picked = self._sampled_tokens()
                if picked is not None:  # YOCO: only tokens whose logits are sampled enter the cross-decoder
                    self_decoder, h, memory = h, h[picked[0]], memory[picked[0]]
            x = layer.input_layernorm(h)
            if layer.kind == MAMBA:
                out, y = layer.attn(x)
                if i == cfg.memory_layer:
                    memory = y
            elif layer.kind == GMU:
                out = layer.attn(x, memory)
            else:
                out = layer.attn(x)
            h = h + out
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        if picked is not None:
            rows, count = picked
            h = self_decoder.index_copy(0, rows[:count].long(), h[:count])  # other rows' logits are not sampled
        return self.final_layernorm(h)

    def _sampled_tokens(self) -> tuple[torch.Tensor, int] | None:
        """With ``--kv-sharing-fast-prefill``: the rows whose logits are sampled (padded) and their count,
        from the metadata vLLM builds for the cross-decoder's layers; None without it or in a dummy run."""
        meta = get_forward_context().attn_metadata
        if not isinstance(meta, dict):
            return None
        cross = meta.get(self.layers[-1].attn.attn.layer_name)
        rows = getattr(cross, "logits_indices_padded", None)
        return None if rows is None else (rows, cross.num_logits_indices)


class Phi4FlashForCausalLM(nn.Module, HasInnerState, IsHybrid):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        problem = unsupported(vllm_config)
        if problem:
            raise ValueError(problem)
        config = vllm_config.model_config.hf_config
        if not isinstance(config, Phi4FlashConfig):
            config = Phi4FlashConfig(**config.to_dict())
        config.validate()
        self.config = config
        self.model = SambaYModel(config, prefix=f"{prefix}.model" if prefix else "model")
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, bias=config.lm_head_bias)
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        return self.model(input_ids, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    @classmethod
    def get_mamba_state_dtype_from_config(cls, vllm_config: VllmConfig):
        return MambaStateDtypeCalculator.mamba1_state_dtype(vllm_config.model_config.dtype,
                                                            vllm_config.cache_config.mamba_cache_dtype,
                                                            vllm_config.cache_config.mamba_ssm_cache_dtype)

    @classmethod
    def get_mamba_state_shape_from_config(cls, vllm_config: VllmConfig):
        hf = vllm_config.model_config.hf_config
        return MambaStateShapeCalculator.mamba1_state_shape(tp_world_size=1,
                                                            intermediate_size=hf.mamba_expand * hf.hidden_size,
                                                            state_size=hf.mamba_d_state, conv_kernel=hf.mamba_d_conv)

    @classmethod
    def get_mamba_state_copy_func(cls):
        return MambaStateCopyFuncCalculator.mamba1_state_copy_func()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        loaded = set()
        for name, tensor in weights:
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            if name not in params:
                raise ValueError(f"unexpected tensor {name!r} in a SambaY checkpoint")
            param = params[name]
            getattr(param, "weight_loader", default_weight_loader)(param, tensor)
            loaded.add(name)
        missing = set(params) - loaded - ({"lm_head.weight"} if self.config.tie_word_embeddings else set())
        if missing:
            raise ValueError(f"SambaY checkpoint lacks {sorted(missing)[:5]} ({len(missing)} tensors)")
        return set(params)


def bind_full_attention_layer(vllm_config, model_runner) -> AttentionRuntime | None:
    """With a fastctx config (``--attention-backend CUSTOM``), the methods run on SambaY's full-attention layer
    (layer L/2+1, whose KV the cross-decoder shares): its two differential maps are the runtime's two
    layers. Returns the runtime, or None when the engine's model is not SambaY."""
    from fastctx.vllm_plugin.checks import validate

    model = model_runner.model
    if not isinstance(model, Phi4FlashForCausalLM):
        return None
    cfg = model.config
    impl = model.model.layers[cfg.kv_layer].attn.attn.impl
    shape = ModelShape(num_layers=2, num_heads=cfg.num_attention_heads // 2,
                       num_kv_heads=cfg.num_key_value_heads // 2, head_dim=cfg.head_dim)
    runtime = AttentionRuntime(validate(vllm_config), shape)

    def request_ids(num_reqs: int) -> list[str] | None:
        ids = model_runner.input_batch.req_ids
        return list(ids[:num_reqs]) if len(ids) >= num_reqs else None

    impl.bind(runtime, request_ids)
    return runtime
