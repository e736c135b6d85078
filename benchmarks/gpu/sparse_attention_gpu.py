"""GPU check and timing of fastctx's Triton sparse prefill kernel (run on an NVIDIA GPU).

1. Correctness: the Triton kernel against the masked-softmax reference on
   sampled query rows (dense, A-shape and vertical-slash indexes, bf16).
2. Speed: one layer of Llama-3-8B-shaped attention (32 query / 8 KV heads,
   head_dim 128, bf16) at 32K-128K tokens, vertical-slash index at ~5% and
   ~10% density, against dense causal SDPA (FlashAttention backend) and,
   when installed, flash_attn's own kernel; efficiency = speedup x density.
3. The Triton last-query sums against their reference at 32K keys.
Prints a table, then one JSON line.

    python benchmarks/gpu/sparse_attention_gpu.py --quick   # 32K only
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparse_attention import synthetic_vertical_slash  # noqa: E402

from fastctx.kernels.estimation import reference_last_query_sums  # noqa: E402
from fastctx.kernels.sparse import reference_sparse_rows, streaming_index  # noqa: E402
from fastctx.kernels.sparse_triton import last_query_sums_triton, sparse_prefill_attention_triton  # noqa: E402

HEADS, KV_HEADS, DIM = 32, 8, 128


def cuda_ms(fn, reps=5) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return min(times)


def check(n=4096) -> float:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(h, n, DIM, generator=g).bfloat16() for h in (HEADS, KV_HEADS, KV_HEADS))
    rows = torch.cat([torch.randperm(n - 64, generator=g)[:64], torch.arange(n - 64, n)])
    worst = 0.0
    for index in (synthetic_vertical_slash(n, 1.0, heads=HEADS), streaming_index(HEADS, n, 128, 1024),
                  synthetic_vertical_slash(n, 0.1, heads=HEADS)):
        got = sparse_prefill_attention_triton(q.cuda(), k.cuda(), v.cuda(), index=index).cpu()[:, rows]
        want = reference_sparse_rows(q.float(), k.float(), v.float(), index=index, rows=rows)
        worst = max(worst, (got.float() - want).abs().max().item())
    return worst


def check_last_query_sums(n=32768, last_q=64) -> float:
    """Largest error of the Triton last-query column/diagonal sums against the reference (bf16 inputs)."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(HEADS, last_q, DIM, generator=g).bfloat16()
    k = torch.randn(KV_HEADS, n, DIM, generator=g).bfloat16()
    got = last_query_sums_triton(q.cuda(), k.cuda(), n - last_q, last_q)
    want = reference_last_query_sums(q.float(), k.float(), n - last_q, last_q)
    return max((a.cpu() - b).abs().max().item() for a, b in zip(got, want))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tokens", type=int, nargs="+", default=[32768, 65536, 131072])
    parser.add_argument("--densities", type=float, nargs="+", default=[0.05, 0.10])
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens = [32768]
    err = check()
    sums_err = check_last_query_sums()
    print(f"{torch.cuda.get_device_name()}  triton-vs-reference max abs err (bf16): sparse prefill {err:.2e}, "
          f"last-query sums {sums_err:.2e}", flush=True)
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        flash_attn_func = None
    rows = []
    for n in args.tokens:
        q = torch.randn(HEADS, n, DIM, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(KV_HEADS, n, DIM, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(KV_HEADS, n, DIM, device="cuda", dtype=torch.bfloat16)
        sdpa = cuda_ms(lambda: F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True,
                                                               enable_gqa=True))
        fa = None
        if flash_attn_func is not None:
            qt, kt, vt = (t.transpose(0, 1)[None].contiguous() for t in (q, k, v))
            fa = cuda_ms(lambda: flash_attn_func(qt, kt, vt, causal=True))
        for target in args.densities:
            index = synthetic_vertical_slash(n, target, heads=HEADS)
            sparse = cuda_ms(lambda: sparse_prefill_attention_triton(q, k, v, index=index))
            row = {"seq_len": n, "density": round(index.density(), 4), "sdpa_ms": round(sdpa, 2),
                   "flash_attn_ms": None if fa is None else round(fa, 2), "triton_sparse_ms": round(sparse, 2),
                   "speedup_vs_sdpa": round(sdpa / sparse, 2),
                   "efficiency": round(sdpa / sparse * index.density(), 3)}
            rows.append(row)
            print(row, flush=True)
    result = {"device": torch.cuda.get_device_name(), "max_abs_err_bf16": err,
              "last_query_sums_max_abs_err": sums_err, "rows": rows}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
