"""One layer of sparse prefill: fastctx's CPU sparse path vs dense torch SDPA, in one run.

Shapes are SmolLM2's (9 query heads, 3 KV heads, head_dim 64, fp32), same
threads and inputs for both. The sparse index is vertical-slash, as
MInference builds it: 30 sink columns and the 100 nearest diagonals always,
plus random columns and clusters of 8 adjacent diagonals, scaled until the
index reaches the target density (share of causal query-key pairs read). The
error is against the masked-softmax reference on 128 sampled query rows.
``no_gather`` times the same kernel with short ranges scored one by one
(``sparse.GATHER_BELOW = 0``), the layout before range gathering.
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
from fastctx.kernels.sparse import dense_index, reference_sparse_rows, sparse_prefill_attention, vertical_slash_index

from attention_kernels import best_ms  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

HEADS, KV_HEADS, DIM = 9, 3, 64


def synthetic_vertical_slash(n: int, target: float, seed: int = 0, block_q: int = 64, heads: int = HEADS):
    if target >= 1.0:
        return dense_index(heads, n, block_q=block_q)
    g = torch.Generator().manual_seed(seed)
    verticals = torch.stack([torch.randperm(n, generator=g) for _ in range(heads)])
    centers = torch.stack([100 + torch.randperm(n - 108, generator=g) for _ in range(heads)])

    def build(scale: float):
        nv, ns = int(scale * n / 8), int(scale * n / 256)
        vertical = torch.cat([torch.arange(30).expand(heads, -1), verticals[:, :nv]], 1)
        clusters = (centers[:, :ns, None] + torch.arange(8)).reshape(heads, -1)
        slash = torch.cat([torch.arange(100).expand(heads, -1), clusters], 1)
        return vertical_slash_index(vertical, slash, n, block_q=block_q)

    lo, hi = 0.0, 1.0
    for _ in range(14):  # density grows with scale: bisect to the target
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if build(mid).density() < target else (lo, mid)
    return build(lo)


def run(n: int, targets: list[float], reps: int) -> list[dict]:
    g = torch.Generator().manual_seed(n)
    q = torch.randn(HEADS, n, DIM, generator=g)
    k = torch.randn(KV_HEADS, n, DIM, generator=g)
    v = torch.randn(KV_HEADS, n, DIM, generator=g)
    sdpa_ms = best_ms(lambda: F.scaled_dot_product_attention(
        q[None], k[None], v[None], is_causal=True, enable_gqa=True), max(1, reps - 1), warmup=False)
    rows = torch.cat([torch.randperm(n - 64, generator=g)[:64], torch.arange(n - 64, n)])
    out = []
    for target in targets:
        index = synthetic_vertical_slash(n, target)
        density = index.density()
        sparse_ms = best_ms(lambda: sparse_prefill_attention(q, k, v, index=index), reps)
        gather_below, sparse.GATHER_BELOW = sparse.GATHER_BELOW, 0  # baseline: one sgemm per range
        try:
            no_gather_ms = best_ms(lambda: sparse_prefill_attention(q, k, v, index=index), reps)
        finally:
            sparse.GATHER_BELOW = gather_below
        got = sparse_prefill_attention(q, k, v, index=index)[:, rows]
        err = (got - reference_sparse_rows(q, k, v, index=index, rows=rows)).abs().max().item()
        speedup = sdpa_ms / sparse_ms
        out.append({"seq_len": n, "target_density": target, "density": round(density, 4),
                    "sdpa_ms": round(sdpa_ms, 1), "sparse_ms": round(sparse_ms, 1),
                    "speedup_vs_sdpa": round(speedup, 2),
                    "speedup_x_density": round(speedup * density, 3), "max_abs_err": err,
                    "sparse_no_gather_ms": round(no_gather_ms, 1),
                    "gather_speedup": round(no_gather_ms / sparse_ms, 3)})
        print(f"{n:>6} {target:>6.2f} {density:>8.4f} {sdpa_ms:>9.1f} {sparse_ms:>10.1f} "
              f"{speedup:>8.2f} {speedup * density:>9.3f} {err:>9.1e} {no_gather_ms:>10.1f}", flush=True)
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="16K tokens at ~5%% density")
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192, 32768, 65536])
    parser.add_argument("--densities", type=float, nargs="+", default=[0.02, 0.05, 0.10, 0.20, 1.0])
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.densities, args.reps = [16384], [0.05], 3
    torch.set_num_threads(args.threads)
    print(f"threads={args.threads} heads={HEADS}/{KV_HEADS} head_dim={DIM} fp32")
    print(f"{'N':>6} {'target':>6} {'density':>8} {'sdpa_ms':>9} {'sparse_ms':>10} "
          f"{'speedup':>8} {'x_density':>9} {'max_err':>9} {'no_gather':>10}")
    rows = [row for n in args.tokens for row in run(n, args.densities, args.reps)]
    result = {**rows[-1], "threads": args.threads}
    if len(rows) > 1:
        result["rows"] = rows
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
