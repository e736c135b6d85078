"""benchmarks/gpu/check.sh on a machine without a GPU: it stops at once and says why."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu" / "check.sh"


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the script runs the whole check")
def test_check_stops_at_once_without_a_cuda_device(tmp_path):
    run = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out")})
    assert run.returncode == 2
    assert "no CUDA device" in run.stderr
    assert not (tmp_path / "out").exists()  # nothing ran


def test_check_names_a_python_without_torch(tmp_path):
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    run = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHON": str(fake)})
    assert run.returncode == 2 and "cannot import torch" in run.stderr
