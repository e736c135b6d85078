"""Build-on-first-use loader for fastctx's C++ CPU kernels.

The extension is compiled for the machine it runs on (``-march=native``),
once, into ``$FASTCTX_HOME/torch_extensions``; later processes load it in
milliseconds. ``make setup`` builds it ahead of time.
"""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

_SOURCES = [Path(__file__).with_name("csrc") / "sparse_prefill_cpu.cpp"]


@functools.lru_cache(maxsize=1)
def cpu_ops():
    import torch
    from torch.utils.cpp_extension import load

    from fastctx.models import fastctx_home

    # Built with -march=native against this torch's ABI: key the build by both.
    tag = f"torch{torch.__version__}-{platform.machine()}".replace("+", "_")
    build_dir = fastctx_home() / "torch_extensions" / f"sparse_prefill_cpu-{tag}"
    build_dir.mkdir(parents=True, exist_ok=True)
    return load(name="fastctx_sparse_prefill_cpu", sources=[str(s) for s in _SOURCES],
                build_directory=str(build_dir),
                extra_cflags=["-O3", "-march=native", "-fopenmp", "-fno-math-errno"],
                extra_ldflags=["-fopenmp"], verbose=bool(os.environ.get("FASTCTX_VERBOSE_BUILD")))
