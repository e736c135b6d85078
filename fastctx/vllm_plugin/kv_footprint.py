"""What a vLLM engine keeps per sequence in its KV cache, from the engine's own per-layer cache specs.

Full-attention layers grow by a fixed number of bytes per token; sliding-window
layers stop growing at their window; Mamba layers hold one fixed-size state.
Layers that share another layer's KV (``kv_sharing_target_layer_name``) have no
spec, so they add nothing. Bytes are logical (what the layers store), before
vLLM rounds to whole blocks.
"""

from __future__ import annotations


def kv_footprint(specs: dict, seq_len: int) -> dict:
    """``specs``: layer name -> vLLM ``KVCacheSpec`` (``Worker.get_kv_cache_spec()``)."""
    from vllm.v1.kv_cache_interface import AttentionSpec, MambaSpec

    full = window = state = 0
    counts = {"full_attention_layers": 0, "sliding_window_layers": 0, "mamba_layers": 0}
    for spec in specs.values():
        if isinstance(spec, MambaSpec):
            counts["mamba_layers"] += 1
            state += spec.real_page_size_bytes
        elif isinstance(spec, AttentionSpec):
            per_token = spec.real_page_size_bytes // spec.block_size
            span = getattr(spec, "sliding_window", None)
            if span:
                counts["sliding_window_layers"] += 1
                window += per_token * min(span, seq_len)
            else:
                counts["full_attention_layers"] += 1
                full += per_token
        else:
            raise ValueError(f"no KV footprint rule for {type(spec).__name__}")
    total = full * seq_len + window + state
    return {**counts, "full_bytes_per_token": full, "sliding_window_bytes_per_sequence": window,
            "mamba_bytes_per_sequence": state, "seq_len": seq_len, "bytes_per_token": round(total / seq_len, 1)}


def engine_kv_footprint(llm, seq_len: int) -> dict:
    """``kv_footprint`` of an ``LLM``'s engine (its first worker), for an engine started with
    ``worker_extension_cls="fastctx.vllm_plugin.worker.FastctxWorkerExtension"``: the specs hold torch
    dtypes, which vLLM does not send between processes, so the footprint is computed in the worker."""
    return llm.collective_rpc("fastctx_kv_footprint", args=(seq_len,))[0]
