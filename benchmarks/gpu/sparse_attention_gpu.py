"""GPU check and timing of fastctx's Triton sparse prefill kernel (run on an NVIDIA GPU).

1. Correctness: the Triton kernel against the masked-softmax reference on
   sampled query rows (dense, A-shape and vertical-slash indexes, bf16), and the
   Triton last-query sums against their reference at 32K keys.
2. Launch settings: the kernel's tile width and Triton's warps and pipeline
   stages swept at 32K tokens, 5% density; the fastest is timed beside the
   defaults below.
3. Speed: one layer of Llama-3-8B-shaped attention (32 query / 8 KV heads,
   head_dim 128, bf16) at 32K-128K tokens, vertical-slash index at ~5% and
   ~10% density, against dense causal attention by PyTorch's FlashAttention-2
   SDPA backend (the goal's yardstick; K/V heads repeated for it), cuDNN's SDPA
   backend and flash_attn's own kernel where they run; efficiency = speedup
   over flash SDPA x density (1.0 = as fast per attended pair as FlashAttention).
Each measurement that fails is reported with its error; the rest go on.
Prints a table, then one JSON line.

    python benchmarks/gpu/sparse_attention_gpu.py --quick   # 32K only
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparse_attention import synthetic_vertical_slash  # noqa: E402

from fastctx.kernels.estimation import reference_last_query_sums  # noqa: E402
from fastctx.kernels.sparse import dense_index, reference_sparse_rows, streaming_index  # noqa: E402
from fastctx.kernels.sparse_triton import last_query_sums_triton, sparse_prefill_attention_triton  # noqa: E402

HEADS, KV_HEADS, DIM = 32, 8, 128
CALIBRATE_AT = 16384  # where indexes cannot be built on the GPU, densities are bisected at this length
SWEEP = {"block_n": (32, 64, 128), "num_warps": (4, 8), "num_stages": (2, 3)}


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


def attempt(what: str, fn):
    """``fn()``, or None with the error printed: one failing measurement must not cost the others."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001  (a GPU run is scarce: report and go on)
        print(f"  {what} failed: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
        return None


def on_gpu(index):
    return dataclasses.replace(index, ranges=index.ranges.cuda(), cols=index.cols.cuda())


def vertical_slash_on_gpu(n: int, target: float):
    """The synthetic index built (and its density bisected) on the GPU; on the host if that fails."""
    index = attempt("index built on the GPU", lambda: synthetic_vertical_slash(n, target, heads=HEADS, device="cuda"))
    if index is None:
        index = on_gpu(synthetic_vertical_slash(n, target, heads=HEADS, calibrate_at=CALIBRATE_AT))
    return index


def check_index_on_gpu(n=8192) -> bool:
    """The vertical-slash index and its pair counts built on the GPU equal the host's."""
    host = synthetic_vertical_slash(n, 0.1, heads=HEADS)
    gpu = synthetic_vertical_slash(n, 0.1, heads=HEADS, device="cuda")
    return (torch.equal(host.ranges, gpu.ranges.cpu()) and torch.equal(host.cols, gpu.cols.cpu())
            and host.pair_counts() == tuple(int(c) for c in gpu.pair_counts()))


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


def qkv(n: int):
    g = torch.Generator(device="cuda").manual_seed(n)
    return tuple(torch.randn(h, n, DIM, device="cuda", dtype=torch.bfloat16, generator=g)
                 for h in (HEADS, KV_HEADS, KV_HEADS))


def sweep(n=32768, target=0.05) -> tuple[dict, list[dict]]:
    """The fastest launch settings at ``n`` tokens and ``target`` density, and every setting's time."""
    q, k, v = qkv(n)
    index = vertical_slash_on_gpu(n, target)
    timed = []
    for values in itertools.product(*SWEEP.values()):
        config = dict(zip(SWEEP, values))
        ms = attempt(f"settings {config}",
                     lambda: cuda_ms(lambda: sparse_prefill_attention_triton(q, k, v, index=index, **config), reps=3))
        if ms is not None:
            timed.append({**config, "ms": round(ms, 3)})
            print(f"  {config}: {ms:.2f} ms", flush=True)
    best = min(timed, key=lambda t: t["ms"]) if timed else {"ms": None}
    return {name: best.get(name) for name in SWEEP}, timed


def dense_baselines(q, k, v) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    group = HEADS // KV_HEADS
    qb, kb, vb = q[None], k.repeat_interleave(group, 0)[None], v.repeat_interleave(group, 0)[None]

    def sdpa(backend):
        def run():
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(qb, kb, vb, is_causal=True)
        return lambda: cuda_ms(run)

    times = {"flash_sdpa_ms": attempt("flash SDPA", sdpa(SDPBackend.FLASH_ATTENTION)),
             "cudnn_sdpa_ms": attempt("cuDNN SDPA", sdpa(SDPBackend.CUDNN_ATTENTION))}
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        times["flash_attn_ms"] = None
    else:
        qt, kt, vt = (t.transpose(0, 1)[None].contiguous() for t in (q, k, v))
        times["flash_attn_ms"] = attempt("flash_attn",
                                         lambda: cuda_ms(lambda: flash_attn_func(qt, kt, vt, causal=True)))
    return {name: None if ms is None else round(ms, 2) for name, ms in times.items()}


def timed_rows(n: int, densities: list[float], tuned: dict) -> list[dict]:
    """The dense baselines and the sparse kernel (default and tuned launch settings) at ``n`` tokens."""
    q, k, v = qkv(n)
    base = dense_baselines(q, k, v)
    print(f"{n} tokens, dense: {base}", flush=True)
    rows = []
    for target in densities:
        started = time.perf_counter()
        index = vertical_slash_on_gpu(n, target) if target < 1.0 else on_gpu(dense_index(HEADS, n))
        density = index.density()
        built_s = time.perf_counter() - started
        default = attempt("sparse (default settings)",
                          lambda: cuda_ms(lambda: sparse_prefill_attention_triton(q, k, v, index=index)))
        fast = attempt("sparse (best settings)",
                       lambda: cuda_ms(lambda: sparse_prefill_attention_triton(q, k, v, index=index, **tuned)))
        row = {"seq_len": n, "density": round(density, 4), **base,
               "triton_sparse_ms": None if default is None else round(default, 2),
               "triton_sparse_best_ms": None if fast is None else round(fast, 2), "index_s": round(built_s, 1)}
        flash = base["flash_sdpa_ms"]
        sparse_ms = min((t for t in (default, fast) if t is not None), default=None)
        if flash is not None and sparse_ms is not None:
            row["speedup_vs_flash_sdpa"] = round(flash / sparse_ms, 2)
            row["efficiency"] = round(flash / sparse_ms * density, 3)
        rows.append(row)
        print(row, flush=True)
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tokens", type=int, nargs="+", default=[32768, 65536, 131072])
    parser.add_argument("--densities", type=float, nargs="+", default=[0.05, 0.10])
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens = [32768]
    import triton

    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    result["max_abs_err_bf16"] = attempt("sparse prefill check", check)
    result["last_query_sums_max_abs_err"] = attempt("last-query sums check", check_last_query_sums)
    result["index_on_gpu_equals_host"] = attempt("index on the GPU", check_index_on_gpu)
    print(f"{result['device']}  triton-vs-reference max abs err (bf16): sparse prefill {result['max_abs_err_bf16']}, "
          f"last-query sums {result['last_query_sums_max_abs_err']}", flush=True)
    print("launch settings at 32K tokens, 5% density:", flush=True)
    best, result["sweep"] = sweep()
    result["best_settings"] = best
    tuned = {name: value for name, value in best.items() if value is not None}
    rows = []
    for n in args.tokens:
        rows += timed_rows(n, ([1.0] if n == args.tokens[0] else []) + args.densities, tuned)
        torch.cuda.empty_cache()
    result["rows"] = rows
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
