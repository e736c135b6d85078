"""Mamba-1 selective scan: the PyTorch reference vs the C++ CPU kernel, one sequence, in one run.

Same inputs for both (float32, SambaY-sized: channels = 2 x width), same threads;
best of ``--reps`` after a warm-up. The last line printed is one JSON object.

    python benchmarks/mamba_scan.py --quick          # 2048 tokens, 1024 channels, state 16
    python benchmarks/mamba_scan.py --tokens 8192 --channels 5120
"""

from __future__ import annotations

import argparse
import json

import torch

from fastctx.kernels.mamba import selective_scan, selective_scan_reference

from attention_kernels import best_ms  # noqa: E402  (benchmarks/ is on sys.path)
from engines import machine  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2048 tokens, 1024 channels, 3 reps")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--channels", type=int, default=1024)
    parser.add_argument("--state", type=int, default=16)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.channels, args.reps = 2048, 1024, 3
    g = torch.Generator().manual_seed(0)
    T, ch, n = args.tokens, args.channels, args.state
    inputs = (torch.randn(T, ch, generator=g), torch.rand(T, ch, generator=g) * 0.1, -torch.rand(ch, n, generator=g),
              torch.randn(T, n, generator=g), torch.randn(T, n, generator=g), torch.randn(ch, generator=g))
    ref_s = best_ms(lambda: selective_scan_reference(*inputs), args.reps) / 1e3
    cpp_s = best_ms(lambda: selective_scan(*inputs), args.reps) / 1e3
    err = (selective_scan(*inputs)[0] - selective_scan_reference(*inputs)[0]).abs().max().item()
    result = {"tokens": T, "channels": ch, "state": n, "threads": torch.get_num_threads(), **machine(),
              "reference_ms": round(ref_s * 1e3, 2), "cpp_ms": round(cpp_s * 1e3, 2),
              "speedup_cpp_vs_reference": round(ref_s / cpp_s, 2), "max_abs_error": err}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
