"""One layer of causal prefill attention: vLLM's CPU paged kernel vs fastctx's dense prefill.

Same thread count, same random q/k/v (SmolLM2 shapes: 9 query heads, 3 KV
heads, head_dim 64, fp32) for both; vLLM reads K/V from its paged cache,
fastctx from contiguous tensors. Prints a table, then one JSON line.

    python benchmarks/attention_kernels.py --quick      # 2K and 4K tokens
    python benchmarks/attention_kernels.py --tokens 2048 4096 8192 16384
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from fastctx.kernels import prefill_attention


def best_ms(fn, reps: int, warmup: bool = True) -> float:
    """Fastest of ``reps`` timed calls, in milliseconds (after one untimed call if ``warmup``)."""
    if warmup:
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def vllm_prefill(q, k, v, block_size=128):
    """A closure running vLLM's CPU attention over a paged copy of k/v; returns (fn, out)."""
    from vllm import _custom_ops as ops

    tokens, kv_heads, dim = k.shape
    blocks = -(-tokens // block_size)
    cache = torch.zeros(blocks, kv_heads, block_size, 2 * dim, dtype=k.dtype)
    key_cache, value_cache = cache.view(blocks, kv_heads, 2 * block_size, dim).chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, torch.arange(tokens), "vec",
                                   k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")
    qsl = torch.tensor([0, tokens], dtype=torch.int32)
    seq_lens = torch.tensor([tokens], dtype=torch.int32)
    table = torch.arange(blocks, dtype=torch.int32)[None]
    sched = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=1, num_heads=q.shape[1], num_kv_heads=kv_heads, head_dim=dim, seq_lens=seq_lens,
        dtype=q.dtype, query_start_loc=qsl, causal=True, sliding_window_size=-1, isa="vec",
        enable_kv_split=True, dynamic_causal=None, kv_cache_dtype="auto")
    out = torch.empty_like(q)

    def run():
        ops.cpu_attention_with_kv_cache(
            query=q, key_cache=key_cache, value_cache=value_cache, output=out,
            query_start_loc=qsl, seq_lens=seq_lens, scale=dim ** -0.5, causal=True,
            alibi_slopes=None, sliding_window=-1, block_table=table, softcap=0,
            scheduler_metadata=sched, s_aux=None, dynamic_causal=None, k_scale=1.0,
            v_scale=1.0, kv_cache_dtype="auto")
    return run, out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2K and 4K tokens, 2 reps")
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.reps = [2048, 4096], 2
    torch.set_num_threads(args.threads)
    rows = []
    print(f"threads={args.threads}\n{'tokens':>7} {'vllm_ms':>9} {'fastctx_ms':>10} {'ratio':>6} {'max_abs_err':>11}")
    for n in args.tokens:
        g = torch.Generator().manual_seed(n)
        q, k, v = (torch.randn(n, h, 64, generator=g) for h in (9, 3, 3))
        run_vllm, out_vllm = vllm_prefill(q, k, v)
        vllm_ms = best_ms(run_vllm, args.reps)
        qh, kh, vh = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
        fast_ms = best_ms(lambda: prefill_attention(qh, kh, vh), args.reps)
        err = (prefill_attention(qh, kh, vh).transpose(0, 1) - out_vllm).abs().max().item()
        rows.append({"tokens": n, "vllm_ms": round(vllm_ms, 1), "fastctx_dense_ms": round(fast_ms, 1),
                     "speedup_vs_vllm": round(vllm_ms / fast_ms, 3), "max_abs_err": err})
        print(f"{n:>7} {vllm_ms:>9.1f} {fast_ms:>10.1f} {vllm_ms / fast_ms:>6.2f} {err:>11.2e}")
    result = {"threads": args.threads, "rows": rows}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
