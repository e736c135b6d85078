"""fastctx attention backend for SGLang: translates metadata, nothing else.

SGLang keeps every layer's K and V token-major (``[slots, kv_heads, head_dim]``)
and maps (request row, position) to a slot through ``req_to_token``. With a page
size of P, a run of P positions sits in P consecutive slots starting at a multiple
of P, so the pool is a paged cache of ``[pages, kv_heads, P, head_dim]`` (a strided
view, nothing copied) and ``req_to_token[row, ::P] // P`` is a block table. Each
layer's extend (prefill chunks, with or without a radix-cached prefix) becomes a
``fastctx.core.StepBatch`` for the engine's ``AttentionRuntime``; decodes stay on
SGLang's ``torch_native`` kernel unless a decode method is configured.

What this adapter does not translate (cross or encoder-only attention, sliding
windows, Q/K and V of different head sizes, soft-capped logits) runs ``torch_native``,
and the reason is logged once. Speculative verification (``TARGET_VERIFY``: each request's
draft tree after its committed tokens, with SGLang's tree mask) becomes one tree read per
request (``AttentionRuntime.tree_reads``); draft-model extends are not translated, so the
plugin admits only draft-free algorithms (NGRAM, fastctx's SPECTR) with this backend.
"""

from __future__ import annotations

import logging
from itertools import accumulate

import torch
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from sglang.srt.layers.radix_attention import AttentionType
from sglang.srt.mem_cache.memory_pool import KVWriteLoc
from sglang.srt.model_executor.forward_batch_info import ForwardMode
from sglang.srt.runtime_context import get_parallel

from fastctx.core import AttentionRuntime, StepBatch
from fastctx.kernels.attention import paged_attention
from fastctx.kernels.paged import PagedKV
from fastctx.methods import ModelShape
from fastctx.sglang_plugin.settings import runtime_config

logger = logging.getLogger(__name__)

# Prefill chunks (with or without a cached prefix), chunked prefill mixed with decodes, decodes.
TRANSLATED = (ForwardMode.EXTEND, ForwardMode.MIXED, ForwardMode.DECODE)
# This process's runtimes (one per backend SGLang built), read by the state report.
RUNTIMES: list[AttentionRuntime] = []


class FastctxAttnBackend(TorchNativeAttnBackend):
    def __init__(self, model_runner):
        super().__init__(model_runner)
        config = runtime_config()
        mc, tp = model_runner.model_config, get_parallel().attn_tp_size
        self.shape = ModelShape(num_layers=mc.num_hidden_layers, num_heads=mc.get_num_attention_heads(tp),
                                num_kv_heads=mc.get_num_kv_heads(tp), head_dim=mc.head_dim)
        self.runtime = AttentionRuntime(config, self.shape)
        RUNTIMES.append(self.runtime)
        self.page_size = model_runner.page_size
        self._step = None
        self._verify = None  # a TARGET_VERIFY step's (StepBatch fields, tree reads)
        self._logged: set[str] = set()
        logger.info("fastctx attention: prefill %r, decode %r, config %s", config.attention, config.decode,
                    config.as_dict())

    def init_forward_metadata(self, forward_batch):
        super().init_forward_metadata(forward_batch)
        mode = forward_batch.forward_mode
        self._step = self._verify = None
        if mode.is_target_verify():
            self._verify = self._verify_step(forward_batch)
            return
        if mode.is_decode():
            # A decode batch holds every running request, so any other request's state is stale
            # (finished, or retracted and to be prefilled again).
            rids = forward_batch.rids or []
            self.runtime.free(set(self.runtime.states.live()) - set(rids))
        if (mode not in TRANSLATED or self.use_sliding_window_kv_pool or forward_batch.encoder_lens is not None):
            return
        seq_lens = forward_batch.seq_lens_cpu.tolist()
        if mode.is_decode():
            query_start, num_decodes = list(range(len(seq_lens) + 1)), len(seq_lens)
        else:
            query_start, num_decodes = [0, *accumulate(forward_batch.extend_seq_lens_cpu)], 0
        self._step = (query_start, seq_lens, num_decodes, self._block_table(forward_batch), forward_batch.rids)

    def _verify_step(self, forward_batch):
        """Each request's draft tree follows its committed tokens (``seq_lens`` in this mode) in the
        slots ``req_to_token`` maps them to; the tree mask is draft-vs-draft (``[n, n]`` per request,
        SGLang's CPU layout) or includes the committed columns (``[n, committed + n]``, its GPU one)."""
        n = forward_batch.spec_info.draft_token_num
        committed = forward_batch.seq_lens_cpu.tolist()
        mask = forward_batch.spec_info.custom_mask.to("cpu", torch.bool)
        if mask.numel() == len(committed) * n * n:
            trees = list(mask.view(-1, n, n))
        else:
            parts = mask.split([n * (c + n) for c in committed])
            trees = [part.view(n, c + n)[:, c:] for part, c in zip(parts, committed)]
        seq_lens = [c + n for c in committed]
        query_start = list(range(0, n * len(committed) + 1, n))
        return query_start, seq_lens, self._block_table(forward_batch), self.runtime.tree_reads(trees, seq_lens)

    def _block_table(self, forward_batch) -> torch.Tensor:
        """The batch's block table: ``req_to_token`` rows, one slot per page of ``page_size``."""
        rows = self.req_to_token_pool.req_to_token[forward_batch.req_pool_indices]
        return (rows if self.page_size == 1 else rows[:, ::self.page_size] // self.page_size).to(torch.int32)

    def _why_not(self, layer, forward_batch) -> str | None:
        if self._step is None:
            mode = forward_batch.forward_mode
            if mode not in TRANSLATED:
                return f"forward mode {mode.name}"
            return "encoder lengths or a sliding-window pool"
        return self._why_not_layer(layer)

    def _why_not_layer(self, layer) -> str | None:
        if layer.is_cross_attention or layer.attn_type == AttentionType.ENCODER_ONLY:
            return "non-causal attention"
        if layer.sliding_window_size is not None and layer.sliding_window_size > -1:
            return "sliding-window layers"
        if layer.qk_head_dim != layer.v_head_dim:
            return "different Q/K and V head sizes"
        if layer.logit_cap:
            return "logit soft-cap"
        return None

    def _fallback(self, why: str, layer) -> None:
        if why not in self._logged:
            self._logged.add(why)
            logger.warning("fastctx: %s runs on torch_native (from layer %d on)", why, layer.layer_id)

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        if self._verify is not None:
            return self._forward_verify(q, k, v, layer, forward_batch, save_kv_cache)
        why = self._why_not(layer, forward_batch)
        if why:
            self._fallback(why, layer)
            return super().forward_extend(q, k, v, layer, forward_batch, save_kv_cache)
        return self._forward(q, k, v, layer, forward_batch, save_kv_cache)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        why = None if self.runtime.engine_decodes else self._why_not(layer, forward_batch)
        if self.runtime.engine_decodes or why:
            if why:
                self._fallback(why, layer)
            return super().forward_decode(q, k, v, layer, forward_batch, save_kv_cache)
        return self._forward(q, k, v, layer, forward_batch, save_kv_cache)

    def _forward(self, q, k, v, layer, forward_batch, save_kv_cache):
        if save_kv_cache and k is not None and v is not None:
            self.token_to_kv_pool.set_kv_buffer(layer, KVWriteLoc(forward_batch.out_cache_loc,
                                                                  self.swa_out_cache_loc), k, v)
        query_start, seq_lens, num_decodes, table, rids = self._step
        heads, dim = layer.tp_q_head_num, layer.qk_head_dim
        query = q.reshape(-1, heads, dim)
        out = torch.empty_like(query)
        batch = StepBatch(query=query, kv=self._paged(layer.layer_id), block_table=table, query_start=query_start,
                          seq_lens=seq_lens, num_decodes=num_decodes, request_ids=rids)
        self.runtime.forward(batch, layer.layer_id, layer.scaling, out)
        return out.view(-1, heads * dim)

    def _forward_verify(self, q, k, v, layer, forward_batch, save_kv_cache):
        why = self._why_not_layer(layer)
        if why:  # torch_native cannot verify either: stop with the reason rather than compute garbage
            raise NotImplementedError(f"fastctx: speculative verification over {why} is not translated")
        if save_kv_cache and k is not None and v is not None:
            self.token_to_kv_pool.set_kv_buffer(layer, KVWriteLoc(forward_batch.out_cache_loc,
                                                                  self.swa_out_cache_loc), k, v)
        query_start, seq_lens, table, reads = self._verify
        heads, dim = layer.tp_q_head_num, layer.qk_head_dim
        query = q.reshape(-1, heads, dim)
        out = torch.empty_like(query)
        paged_attention(query, self._paged(layer.layer_id), table, query_start, seq_lens, reads,
                        scale=layer.scaling, out=out)
        return out.view(-1, heads * dim)

    def _paged(self, layer_id: int) -> PagedKV:
        def pages(buf: torch.Tensor) -> torch.Tensor:
            slots, kv_heads, dim = buf.shape
            return buf.view(slots // self.page_size, self.page_size, kv_heads, dim).transpose(1, 2)

        pool = self.token_to_kv_pool
        return PagedKV(pages(pool.get_key_buffer(layer_id)), pages(pool.get_value_buffer(layer_id)))
