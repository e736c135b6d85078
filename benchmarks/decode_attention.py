"""One decode step of attention over a long paged KV cache: dense vs LServe, side by side.

Same threads, same random q/k/v (SmolLM2 shapes: 30 layers, 9 query heads, 3 KV
heads, head_dim 64), one request of ``--context`` tokens written by vLLM's own
writer into a CPU cache (block 128, scattered blocks) per layer, for every layer
of the model (``--layers N``: the first N), so the caches do not sit in the CPU's
caches. Timed per decode step, summed over the layers:

- ``vllm``: vLLM's ``cpu_attention_with_kv_cache`` (its fastest layout here);
- ``dense``: fastctx's batch kernel reading every key;
- ``lserve``: LServe's decode (page bounds kept current, page selection every
  ``reselect_interval`` steps, streaming heads from the shipped SmolLM2
  calibration, layer by layer) plus the kernel over what it selected.

LServe makes half of the model's KV heads streaming heads, unevenly over the
layers (most of the first layers keep every head dense). ``decode_attn_speedup``
is the model's step; ``decode_attn_speedup_dense_layers`` is the same over the
layers where no head streams, i.e. what page selection alone gives.

Each step appends one token; steps run in rounds of ``reselect_interval``, so
selection steps (bounds brought up to date, pages chosen) and reuse steps are
both in the average; LServe's time is also split into its decode method and the
kernel. Building the bounds of the whole context once (when a request first
decodes) is reported apart. The last line printed is one JSON object.

    python benchmarks/decode_attention.py --quick          # 64K context, 4K budget, every layer
    python benchmarks/decode_attention.py --context 131072 --budget 4096
"""

from __future__ import annotations

import argparse
import json
import time

import torch

LAYERS, HEADS, KV_HEADS, DIM = 30, 9, 3, 64


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="64K context, 4K budget, every layer, 3 rounds")
    parser.add_argument("--context", type=int, default=65536)
    parser.add_argument("--budget", type=int, default=4096, help="LServe token_budget")
    parser.add_argument("--streaming-fraction", type=float, default=0.5,
                        help="LServe streaming_fraction (the paper's 0.5; fastctx-eval runs 0.25 on SmolLM2)")
    parser.add_argument("--layers", type=int, default=LAYERS, help=f"the first N of the model's {LAYERS} layers")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of reselect_interval steps")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"],
                        help="default: the dtype stock vLLM is fastest at on this CPU (bf16 with AVX512-BF16)")
    args = parser.parse_args(argv)
    from fastctx.kernels._cpu_ext import cpu_ops
    from fastctx.kernels.attention import Read, paged_attention
    from fastctx.kernels.paged import SeqKV
    from fastctx.methods import DecodeBatch, ModelShape
    from fastctx.methods.lserve import DEFAULT_MODEL_HEADS, LServe, LServeParams
    from fastctx.vllm_plugin.paged_kv import cpu_paged_kv

    from attention_kernels import vllm_cache, vllm_isa, vllm_kernel  # noqa: E402  (benchmarks/ is on sys.path)
    from engines import fast_dtype, machine  # noqa: E402

    dtype = getattr(torch, args.dtype or fast_dtype())
    if hasattr(torch._C, "_cpu") and hasattr(torch._C._cpu, "_init_amx"):
        torch._C._cpu._init_amx()  # vLLM's AMX kernel needs the process's AMX permission
    params = LServeParams(head_scores=str(DEFAULT_MODEL_HEADS), token_budget=args.budget,
                          streaming_fraction=args.streaming_fraction)
    method = LServe(params, ModelShape(num_layers=LAYERS, num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=DIM))
    cpu_ops()  # built or loaded before anything is timed
    steps = params.reselect_interval * args.rounds
    total = args.context + steps + 1  # room for the tokens the steps append
    isa = vllm_isa(dtype)
    g = torch.Generator().manual_seed(0)
    layers = []
    for layer in range(args.layers):
        k, v = (torch.randn(total, KV_HEADS, DIM, generator=g).to(dtype) for _ in range(2))
        cache, _, _, table = vllm_cache(k, v, seed=layer)
        _, vkey, vvalue, vtable = vllm_cache(k, v, seed=layer, isa=isa)
        layers.append((cpu_paged_kv(cache), table, vkey, vvalue, vtable))
        print(f"layer {layer}: cache of {total} tokens written", flush=True)
    queries = torch.randn(steps + 1, 1, HEADS, DIM, generator=g).to(dtype)
    scale = DIM ** -0.5
    out = torch.empty(1, HEADS, DIM, dtype=dtype)
    states = [method.new_state("decode", layer) for layer in range(args.layers)]
    parts = {"method": 0.0, "kernel": 0.0}  # LServe's time in its decode (bounds, selection) and in the kernel

    def lserve_step(step: int, layer: int) -> Read:
        kv, table = layers[layer][:2]
        seq_len = args.context + step
        batch = DecodeBatch(query=queries[step], query_start=[0, 1], seq_lens=[seq_len], kv=kv, block_table=table,
                            layer=layer, scale=scale, states=[states[layer]])
        start = time.perf_counter()
        read = method.decode(batch)[0]
        middle = time.perf_counter()
        paged_attention(queries[step], kv, table, [0, 1], [seq_len], [read], scale=scale, out=out)
        parts["method"] += middle - start
        parts["kernel"] += time.perf_counter() - middle
        return read

    start = time.perf_counter()
    for layer, (kv, table, *_) in enumerate(layers):  # a request's first decode: bounds of its whole context
        states[layer].stats.extend(SeqKV(kv, table[0], args.context))
    bounds_ms = (time.perf_counter() - start) * 1e3 / args.layers

    names = ("vllm", "dense", "lserve")
    times = {name: [] for name in names}  # per step, summed over the layers
    layer_ms = {name: [0.0] * args.layers for name in names}  # per layer, summed over the steps
    read_pairs = causal_pairs = 0
    for step in range(1, steps + 1):
        seq_len = args.context + step
        for name in names:
            step_ms = 0.0
            for layer, (kv, table, vkey, vvalue, vtable) in enumerate(layers):
                start = time.perf_counter()
                if name == "vllm":
                    vllm_kernel(queries[step], vkey, vvalue, vtable, 1, seq_len - 1, scale, out, isa)()
                elif name == "dense":
                    paged_attention(queries[step], kv, table, [0, 1], [seq_len], [Read.DENSE], scale=scale, out=out)
                else:
                    read = lserve_step(step, layer)
                    r, c = read.last_rows_pair_counts(1, seq_len, HEADS)  # as the runtime counts
                    read_pairs, causal_pairs = read_pairs + r, causal_pairs + c
                elapsed = (time.perf_counter() - start) * 1e3
                layer_ms[name][layer] += elapsed
                step_ms += elapsed
            times[name].append(step_ms)
    ms = {name: sum(t) / len(t) for name, t in times.items()}
    interval = params.reselect_interval
    select_ms = sum(times["lserve"][::interval]) / len(times["lserve"][::interval])
    dense_layers = [layer for layer in range(args.layers) if not method.streaming_kv[layer].any()]
    dense_layers_speedup = (round(sum(layer_ms["dense"][x] for x in dense_layers)
                                  / sum(layer_ms["lserve"][x] for x in dense_layers), 2) if dense_layers else None)
    result = {"context": args.context, "budget": args.budget, "layers": args.layers, "dtype": str(dtype)[6:],
              "streaming_fraction": params.streaming_fraction,
              "streaming_kv_heads": int(method.streaming_kv[:args.layers].sum()),
              "kv_heads": args.layers * KV_HEADS, "reselect_interval": interval,
              "vllm_ms": round(ms["vllm"], 3), "dense_ms": round(ms["dense"], 3), "lserve_ms": round(ms["lserve"], 3),
              "lserve_select_step_ms": round(select_ms, 3),
              "lserve_method_ms": round(parts["method"] * 1e3 / steps, 3),
              "lserve_kernel_ms": round(parts["kernel"] * 1e3 / steps, 3),
              "bounds_once_ms_per_layer": round(bounds_ms, 2),
              "density": round(read_pairs / causal_pairs, 4),
              "decode_attn_speedup": round(ms["dense"] / ms["lserve"], 2),
              "decode_attn_speedup_vs_vllm": round(ms["vllm"] / ms["lserve"], 2),
              "dense_layers": len(dense_layers), "decode_attn_speedup_dense_layers": dense_layers_speedup,
              **machine()}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
