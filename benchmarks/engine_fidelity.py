"""The same methods in vLLM and in SGLang: fidelity to each engine's own `dense`, side by side.

Runs `fastctx-eval run` once per engine with the same methods (their default eval
settings), tasks, lengths, seed and dtype, then prints per method the teacher-forced
top-1 agreement and KL(dense || method) on the answer spans and on natural text, for
both engines, their differences, and the density each engine's backend counted.
Fidelity is against the same engine's `dense`, so what differs between engines is how
the adapter hands the method its batch (chunking, cached prefixes, page layout).

    python benchmarks/engine_fidelity.py --out runs/engine_fidelity
    python benchmarks/engine_fidelity.py --quick --out /tmp/ef      # smaller, for a wiring check
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

METHODS = "minference,flexprefill,streaming,lserve"
PARTS = ("answer_span", "natural_text")


def run_engine(engine: str, out: Path, args) -> dict:
    cmd = [sys.executable, "-m", "fastctx.eval.cli", "run", "--engine", engine, "--out", str(out),
           "--methods", args.methods, "--tasks", args.tasks, "--lengths", args.lengths, "--queries", "2",
           "--max-new-tokens", "16", "--text-positions", str(args.text_positions), "--dtype", args.dtype]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return json.loads((out / "results.json").read_text())["methods"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory for the two runs (vllm/, sglang/)")
    parser.add_argument("--methods", default=METHODS)
    parser.add_argument("--tasks", default="passkey,kv")
    parser.add_argument("--lengths", default="4096")
    parser.add_argument("--text-positions", type=int, default=256)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--quick", action="store_true", help="two methods, one task, 2K tokens")
    args = parser.parse_args()
    if args.quick:
        args.methods, args.tasks, args.lengths, args.text_positions = "minference,streaming", "passkey", "2048", 128
    out = Path(args.out)
    results = {engine: run_engine(engine, out / engine, args) for engine in ("vllm", "sglang")}
    rows, worst = [], 0.0
    print("\n| method | part | vLLM top-1 / KL | SGLang top-1 / KL | diff top-1 / KL | density vLLM / SGLang |")
    print("|---|---|---|---|---|---|")
    for method in args.methods.split(","):
        per = {e: results[e][method] for e in results}
        for part in PARTS:
            v, s = (per[e]["fidelity_vs_dense"][part] for e in ("vllm", "sglang"))
            d_top1, d_kl = abs(v["top1_agree"] - s["top1_agree"]), abs(v["kl_nats"] - s["kl_nats"])
            worst = max(worst, d_top1, d_kl)
            dens = [per[e]["overall"]["density"] for e in ("vllm", "sglang")]
            rows.append({"method": method, "part": part, "vllm": v, "sglang": s, "diff_top1": d_top1,
                         "diff_kl": d_kl, "density": dens})
            print(f"| {method} | {part} | {v['top1_agree']:.4f} / {v['kl_nats']:.4f} | "
                  f"{s['top1_agree']:.4f} / {s['kl_nats']:.4f} | {d_top1:.4f} / {d_kl:.4f} | "
                  f"{dens[0]:.3f} / {dens[1]:.3f} |")
    print(json.dumps({"max_abs_diff": worst, "within_0.01": worst <= 0.01, "rows": rows}))


if __name__ == "__main__":
    main()
