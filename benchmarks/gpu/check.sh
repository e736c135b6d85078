#!/usr/bin/env bash
# The prepared check for a GPU machine that has PyTorch and Triton but no vLLM and no network
# (the `device` tool's machine). Under 8 minutes on one H100/H200:
#   1. the Triton kernels' reference grids, natively (the same pytest tests CI runs under Triton's
#      interpreter: sparse prefill, last-query sums, the Mamba scan);
#   2. benchmarks/gpu/sparse_attention_gpu.py: correctness in bf16, then 32K-128K tokens at 5% and
#      10% density against PyTorch's flash SDPA (and flash_attn if installed), and the last-query sums;
#   3. one JSON summary: $OUT/gpu_check.json (OUT defaults to benchmarks/gpu/out).
# pytest is not on that machine: bring its wheels in .gpu-wheels (`make gpu-wheels` here, then carry
# the folder). On a machine without a CUDA device it stops at once with exit status 2.
#
#   bash benchmarks/gpu/check.sh            # the full check
#   QUICK=1 bash benchmarks/gpu/check.sh    # 32K tokens only
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
OUT=${OUT:-benchmarks/gpu/out}

if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "benchmarks/gpu/check.sh: $PY cannot import torch; set PYTHON to the interpreter that has PyTorch" >&2
  exit 2
fi
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "benchmarks/gpu/check.sh: no CUDA device (torch.cuda.is_available() is False); run it on a GPU machine" >&2
  exit 2
fi
mkdir -p "$OUT"
if ! "$PY" -c "import pytest" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --find-links .gpu-wheels pytest || {
    echo "benchmarks/gpu/check.sh: pytest is missing and .gpu-wheels does not provide it; run 'make gpu-wheels' and carry .gpu-wheels" >&2
    exit 3
  }
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1 | tee "$OUT/gpu.txt"

echo "== 1. Triton kernels against their references (native)"
# Compiling each kernel variant dominates: spread the tests over workers where pytest-xdist is there.
workers=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 8")
timeout 200 "$PY" -m pytest -q -p no:cacheprovider $workers tests/test_kernel_grid.py tests/test_mamba_kernels.py \
  -k triton --junitxml "$OUT/kernels.xml" 2>&1 | tee "$OUT/kernels.log"
kernels=${PIPESTATUS[0]}

echo "== 2. sparse prefill and last-query sums at 32K-128K"
timeout 270 "$PY" benchmarks/gpu/sparse_attention_gpu.py ${QUICK:+--quick} 2>&1 | tee "$OUT/sparse.log"
bench=${PIPESTATUS[0]}

"$PY" - "$OUT" "$kernels" "$bench" <<'PYEOF'
import json, sys, xml.etree.ElementTree as ET
out, kernels, bench = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
summary = {"kernel_tests_exit": kernels, "benchmark_exit": bench}
try:
    suite = ET.parse(f"{out}/kernels.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    summary["kernel_tests"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
except (OSError, ET.ParseError) as exc:
    summary["kernel_tests"] = f"no report: {exc}"
lines = [line for line in open(f"{out}/sparse.log") if line.startswith("{")]
summary["benchmark"] = json.loads(lines[-1]) if lines else None
rows = [r for r in (summary["benchmark"] or {}).get("rows", []) if r["seq_len"] == 131072 and r["density"] < 0.075]
summary["efficiency_128k_5pct"] = rows[0]["efficiency"] if rows else None
json.dump(summary, open(f"{out}/gpu_check.json", "w"), indent=1)
print(json.dumps(summary))
PYEOF
[ "$kernels" -eq 0 ] && [ "$bench" -eq 0 ]
