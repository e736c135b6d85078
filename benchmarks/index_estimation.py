"""Sparse-index estimation per prefill chunk: PyTorch reference vs fused C++ column/diagonal sums.

Both MInference and FlexPrefill start from the attention of a chunk's last
queries over every key, reduced to per-column and per-diagonal mass. The
reference materializes the ``[H, last_q, Tk]`` probabilities; the fused CPU
path folds each tile of scores straight into the two sums. This times the
sums alone and each method's whole index build with either path, on the
same random q/k (SmolLM2 shapes: 9 query heads, 3 KV heads, head_dim 64,
fp32), same threads, chunks of 4096 queries after a cached prefix (vLLM's
default chunking). Prints one JSON line per context length.

    python benchmarks/index_estimation.py --quick      # 8K context only
    python benchmarks/index_estimation.py --context 4096 8192 16384 32768
"""

from __future__ import annotations

import argparse
import json
from contextlib import contextmanager

import torch

from fastctx.kernels import estimation
from fastctx.methods import flexprefill, minference

from attention_kernels import best_ms  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

CHUNK = 4096


@contextmanager
def reference_sums():
    """Make both estimators use the PyTorch reference sums (the baseline)."""
    fused = minference.last_query_sums
    minference.last_query_sums = flexprefill.last_query_sums = estimation.reference_last_query_sums
    try:
        yield
    finally:
        minference.last_query_sums = flexprefill.last_query_sums = fused


def measure(context: int, reps: int) -> dict:
    g = torch.Generator().manual_seed(context)
    prefix = context - CHUNK
    q = torch.randn(9, CHUNK, 64, generator=g)
    k = torch.randn(3, context, 64, generator=g)
    scale = 64 ** -0.5
    mi_patterns = [minference.HeadPattern("vertical_and_slash", 256, 512)] * 9
    fx_params = flexprefill.FlexPrefillParams(gamma=0.9, min_budget=512)
    jobs = {
        "sums_last64": lambda: minference.last_query_sums(q, k, prefix, 64, scale),
        "minference_index": lambda: minference.layer_index(mi_patterns, q, k, prefix=prefix),
        "flexprefill_index": lambda: flexprefill.sparse_index(q, k, fx_params, prefix=prefix, scale=scale),
    }
    row = {"context": context, "chunk": CHUNK, "threads": torch.get_num_threads()}
    fused = {name: best_ms(fn, reps) for name, fn in jobs.items()}
    with reference_sums():
        ref = {name: best_ms(fn, reps) for name, fn in jobs.items()}
        want = minference.last_query_sums(q, k, prefix, 64, scale)
    got = minference.last_query_sums(q, k, prefix, 64, scale)
    for name in jobs:
        row[f"{name}_reference_ms"] = round(ref[name], 2)
        row[f"{name}_fused_ms"] = round(fused[name], 2)
        row[f"{name}_speedup"] = round(ref[name] / fused[name], 2)
    row["sums_max_abs_err"] = float(max((a - b).abs().max() for a, b in zip(got, want)))
    return row


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="8K context only")
    parser.add_argument("--context", type=int, nargs="+", default=[4096, 8192, 16384, 32768],
                        help="tokens so far at the end of the chunk (>= 4096)")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args(argv)
    contexts = [8192] if args.quick else args.context
    if min(contexts) < CHUNK:
        parser.error(f"--context must be >= {CHUNK} (one chunk)")
    rows = []
    for context in contexts:
        rows.append(measure(context, args.reps))
        print(json.dumps(rows[-1]), flush=True)
    return rows


if __name__ == "__main__":
    main()
