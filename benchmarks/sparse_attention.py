"""One layer of sparse prefill: fastctx's CPU sparse kernel vs the dense kernels a user has, in one run.

Shapes are SmolLM2's (9 query heads, 3 KV heads, head_dim 64), same threads,
dtype and inputs for all. K/V sit in a vLLM CPU cache (written by vLLM, scattered
blocks of 128); the dense baselines are vLLM's own kernel and fastctx's kernel
with a dense read over that cache, and torch SDPA over contiguous tensors; the
efficiency (speedup x density) is taken against the fastest of them. The sparse index is vertical-slash, as
MInference builds it: 30 sink columns and the 100 nearest diagonals always,
plus random columns and clusters of 8 adjacent diagonals, scaled until the
index reaches the target density (share of causal query-key pairs read). The
error is against the masked-softmax reference on 128 sampled query rows.
``no_gather`` times the same kernel with short ranges scored one by one
(``sparse.GATHER_BELOW = 0``).
The last line printed is one JSON object.

    python benchmarks/sparse_attention.py --quick     # 16K tokens, ~5% density (< 60 s)
    python benchmarks/sparse_attention.py             # N in {8K, 32K, 64K} x {2, 5, 10, 20, 100}%
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from fastctx.kernels import sparse
from fastctx.kernels.attention import Read, paged_attention
from fastctx.kernels.sparse import dense_index, reference_sparse_rows, vertical_slash_index

from attention_kernels import best_ms, vllm_cache, vllm_isa, vllm_kernel  # noqa: E402  (benchmarks/ is on sys.path)

HEADS, KV_HEADS, DIM = 9, 3, 64


def synthetic_vertical_slash(n: int, target: float, seed: int = 0, block_q: int = 64, heads: int = HEADS,
                             calibrate_at: int | None = None, device: str = "cpu"):
    """A vertical-slash index of ``n`` tokens at about ``target`` density, built on ``device``. The
    scale is bisected on indexes of ``calibrate_at`` tokens (``n`` by default; a shorter length
    saves minutes of host time at 128K tokens but reaches a lower density there, 3.7% for 5%)."""
    if target >= 1.0:
        return dense_index(heads, n, block_q=block_q)
    m = min(n, calibrate_at or n)
    lo, hi = 0.0, 1.0
    for _ in range(14):  # density grows with scale: bisect to the target
        mid = (lo + hi) / 2
        density = _vertical_slash(m, mid, seed, block_q, heads, device).density()
        lo, hi = (mid, hi) if density < target else (lo, mid)
    return _vertical_slash(n, lo, seed, block_q, heads, device)


def _vertical_slash(n: int, scale: float, seed: int, block_q: int, heads: int, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    verticals = torch.stack([torch.randperm(n, generator=g) for _ in range(heads)])
    centers = torch.stack([100 + torch.randperm(n - 108, generator=g) for _ in range(heads)])
    nv, ns = int(scale * n / 8), int(scale * n / 256)
    vertical = torch.cat([torch.arange(30).expand(heads, -1), verticals[:, :nv]], 1)
    clusters = (centers[:, :ns, None] + torch.arange(8)).reshape(heads, -1)
    slash = torch.cat([torch.arange(100).expand(heads, -1), clusters], 1)
    return vertical_slash_index(vertical.to(device), slash.to(device), n, block_q=block_q)


def run(n: int, targets: list[float], reps: int, dtype: torch.dtype) -> list[dict]:
    from fastctx.vllm_plugin.paged_kv import cpu_paged_kv

    g = torch.Generator().manual_seed(n)
    q = torch.randn(n, HEADS, DIM, generator=g).to(dtype)
    k = torch.randn(n, KV_HEADS, DIM, generator=g).to(dtype)
    v = torch.randn(n, KV_HEADS, DIM, generator=g).to(dtype)
    cache, key_cache, value_cache, table = vllm_cache(k, v)
    kv = cpu_paged_kv(cache)
    isa = vllm_isa(dtype)  # vLLM's kernel over its own layout for this dtype (AMX tiles for bf16 here)
    _, vllm_key, vllm_value, vllm_table = vllm_cache(k, v, isa=isa)
    scale = DIM ** -0.5
    out = torch.empty_like(q)

    def attend(read):
        return paged_attention(q, kv, table, [0, n], [n], [read], scale=scale, out=out)
    qh, kh, vh = (t.transpose(0, 1)[None] for t in (q, k, v))
    dense = {
        "sdpa": best_ms(lambda: F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, enable_gqa=True),
                        max(1, reps - 1), warmup=False),
        "vllm": best_ms(vllm_kernel(q, vllm_key, vllm_value, vllm_table, n, 0, scale, isa=isa), max(1, reps - 1)),
        "fastctx_dense": best_ms(lambda: attend(Read.DENSE), max(1, reps - 1)),
    }
    fastest = min(dense, key=dense.get)
    rows = torch.cat([torch.randperm(n - 64, generator=g)[:64], torch.arange(n - 64, n)])
    result = []
    for target in targets:
        index = synthetic_vertical_slash(n, target)
        density = index.density()
        read = Read.indexed(index)
        sparse_ms = best_ms(lambda: attend(read), reps)
        gather_below, sparse.GATHER_BELOW = sparse.GATHER_BELOW, 0  # baseline: one tile run per range
        try:
            no_gather_ms = best_ms(lambda: attend(read), reps)
        finally:
            sparse.GATHER_BELOW = gather_below
        got = attend(read)[rows].transpose(0, 1)
        want = reference_sparse_rows(*(x.float().transpose(0, 1) for x in (q, k, v)), index=index, rows=rows)
        err = (got.float() - want.float()).abs().max().item()
        speedup = dense[fastest] / sparse_ms
        result.append({"seq_len": n, "target_density": target, "density": round(density, 4),
                       **{f"{name}_ms": round(ms, 1) for name, ms in dense.items()}, "fastest_dense": fastest,
                       "sparse_ms": round(sparse_ms, 1), "speedup_vs_fastest_dense": round(speedup, 2),
                       "speedup_x_density": round(speedup * density, 3),
                       "speedup_vs_sdpa": round(dense["sdpa"] / sparse_ms, 2), "max_abs_err": err,
                       "sparse_no_gather_ms": round(no_gather_ms, 1),
                       "gather_speedup": round(no_gather_ms / sparse_ms, 3)})
        print(json.dumps(result[-1]), flush=True)
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="16K tokens at ~5%% density")
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192, 32768, 65536])
    parser.add_argument("--densities", type=float, nargs="+", default=[0.02, 0.05, 0.10, 0.20, 1.0])
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                        help="default: the dtype stock vLLM is fastest at on this CPU")
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.densities, args.reps = [16384], [0.05], 3
    torch.set_num_threads(args.threads)
    from engines import fast_dtype, machine  # noqa: E402

    dtype_name = args.dtype or fast_dtype()
    if hasattr(torch._C, "_cpu") and hasattr(torch._C._cpu, "_init_amx"):
        torch._C._cpu._init_amx()  # vLLM's AMX kernel needs the process's AMX permission
    print(f"threads={args.threads} heads={HEADS}/{KV_HEADS} head_dim={DIM} {dtype_name}")
    rows = [row for n in args.tokens for row in run(n, args.densities, args.reps, getattr(torch, dtype_name))]
    result = {**rows[-1], "threads": args.threads, "dtype": dtype_name, **machine()}
    if len(rows) > 1:
        result["rows"] = rows
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
