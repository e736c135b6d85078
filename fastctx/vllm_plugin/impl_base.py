"""What fastctx's vLLM attention impls share on every device: binding to the engine's runtime, the
reasons a layer or batch runs vLLM's own kernel, and handing a step to fastctx's core.

A device adapter mixes ``FastctxImpl`` in front of vLLM's impl class for that device (CPU_ATTN on CPU,
FlashAttention on CUDA) and supplies three things: ``paged_kv(kv_cache)`` (the layer's cache as
fastctx's ``PagedKV``, read in place), ``why_not_cache(kv_cache, layer)`` and ``engine_decodes(...)``
(the decode sub-batch on vLLM's kernel). Its metadata builder adds ``num_decodes``,
``query_start_loc_host``, ``seq_lens_host`` and ``fallback`` (``HostLayout``) to vLLM's metadata.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from vllm.config import get_current_vllm_config
from vllm.logger import init_logger
from vllm.utils.torch_utils import is_quantized_kv_cache
from vllm.v1.attention.backend import AttentionType

from fastctx.core import AttentionRuntime, StepBatch, count_decodes
from fastctx.methods import ModelShape

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

    def count(self, prefill_q_lens: list[int], prefill_seq_lens: list[int], decode_tokens: int) -> None:
        self.steps += 1
        self.decode_tokens += decode_tokens
        self.prefill_requests += len(prefill_q_lens)
        self.prefill_tokens += sum(prefill_q_lens)
        self.prefix_prefills += sum(s > q for q, s in zip(prefill_q_lens, prefill_seq_lens))
        self.mixed_steps += bool(decode_tokens and prefill_q_lens)
        self.history.append((decode_tokens, list(zip(prefill_q_lens, prefill_seq_lens))))


STATS = StepStats()


@dataclass
class HostLayout:
    """A step's batch layout on the host, added to vLLM's metadata once per step (not per layer):
    requests ``[0, num_decodes)`` are decodes (vLLM puts them first when the builder asks). The
    adapters' metadata classes list it before vLLM's, so these defaulted fields come last."""

    num_decodes: int = 0
    query_start_loc_host: list[int] | None = None
    seq_lens_host: list[int] | None = None

    @classmethod
    def of(cls, query_start: list[int], seq_lens: list[int], decode_threshold: int) -> HostLayout:
        """The layout of a step the builder is building, which it also counts in ``STATS``."""
        query_lens = [b - a for a, b in zip(query_start, query_start[1:])]
        nd = count_decodes(query_lens, decode_threshold)
        STATS.count(query_lens[nd:], seq_lens[nd:], query_start[nd])
        return cls(nd, query_start, seq_lens)


class FastctxImpl:
    """Mixed in front of vLLM's impl class: ``class X(FastctxImpl, VllmImpl)``."""

    def _init_fastctx(self) -> None:
        from fastctx.vllm_plugin.checks import validate

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
                              ("sliding window", self.sliding_window not in (None, -1, (-1, -1))),
                              ("logit soft-cap", bool(self.logits_soft_cap)),
                              ("attention sinks", getattr(self, "sinks", None) is not None),
                              ("quantized KV cache", is_quantized_kv_cache(self.kv_cache_dtype)),
                              ("decode context parallelism", getattr(self, "dcp_world_size", 1) > 1)):
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
        engine = super().forward  # vLLM's impl, next in the MRO
        if meta is None:  # warm-up / profiling
            return engine(layer, query, key, value, kv_cache, attn_metadata, output, output_scale, output_block_scale)
        why = (self.fallback or getattr(meta, "fallback", "metadata from another backend")
               or ("fused output quantization" if output_scale is not None or output_block_scale is not None else None)
               or ("not bound to a fastctx runtime (fastctx's worker did not load this model)" if self.runtime is None
                   else None)
               or self.why_not_cache(kv_cache, layer))
        if why:
            if not self._logged:
                logger.warning("fastctx: layer %s runs vLLM's attention kernel: %s", layer.layer_name, why)
                self._logged = True
            return engine(layer, query, key, value, kv_cache, attn_metadata, output, output_scale, output_block_scale)
        nd, seq_lens = meta.num_decodes, meta.seq_lens_host
        runtime = self.runtime
        if runtime.engine_decodes and nd == len(seq_lens):  # a decode-only step: nothing for fastctx
            return engine(layer, query, key, value, kv_cache, attn_metadata, output, output_scale, output_block_scale)
        if runtime.engine_decodes and nd:
            self.engine_decodes(layer, query, key, value, kv_cache, meta, output)
        n = meta.num_actual_tokens
        batch = StepBatch(query=query[:n], kv=self.paged_kv(kv_cache), block_table=meta.block_table,
                          query_start=meta.query_start_loc_host, seq_lens=seq_lens, num_decodes=nd,
                          request_ids=self._request_ids(len(seq_lens)))
        runtime.forward(batch, self.layer_index, self.scale, output[:n].view(n, self.num_heads, self.head_size))
        return output


def bind_attention_layers(vllm_config, model_runner) -> AttentionRuntime | None:
    """Give every fastctx attention layer of an engine its runtime and its index among the engine's
    attention layers (in model order, so hybrid models count only attention). Fails when every
    layer would fall back to vLLM's kernel, naming why."""
    layers = [(name, layer) for name, layer in vllm_config.compilation_config.static_forward_context.items()
              if isinstance(getattr(layer, "impl", None), FastctxImpl)]
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
