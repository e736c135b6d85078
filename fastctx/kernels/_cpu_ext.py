"""Build-on-first-use loader for fastctx's C++ CPU kernels.

The extension is compiled for the machine it runs on (``-march=native``), once,
into ``$FASTCTX_HOME/torch_extensions``; later processes load it in
milliseconds. ``make setup`` builds it ahead of time. The build directory is
keyed by the torch version and by this CPU's instruction-set flags: hosts of one
machine kind differ (AVX2-only, AVX-512, AVX512-BF16, AMX), and a build for one
would crash with an illegal instruction on another that shares the home. It is
keyed by the torch installation too: a build names its torch's include and library
paths, so vLLM's and SGLang's environments sharing one directory rebuilt it (~80 s)
each time a process of the other environment loaded it.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
from pathlib import Path

_SOURCES = [Path(__file__).with_name("csrc") / name
            for name in ("attention_cpu.cpp", "lserve_cpu.cpp", "mamba_cpu.cpp")]


def cpu_flags() -> list[str]:
    """The CPU's instruction-set flags as the kernel reports them (``/proc/cpuinfo``), sorted."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return sorted(set(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return [platform.processor() or platform.machine()]


def cpu_features() -> dict[str, bool]:
    """The features the kernels and benchmarks care about, found at run time."""
    flags = set(cpu_flags())
    return {name: name in flags for name in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")}


def fast_engine_dtype() -> str:
    """The dtype stock vLLM is fastest at on this CPU: bfloat16 with AVX512-BF16 (bf16 matmuls run
    ~2.6x float32 there, attention on AMX tiles where present), else float32 (bf16 is emulated)."""
    return "bfloat16" if cpu_features()["avx512_bf16"] else "float32"


def _build_tag() -> str:
    import torch

    flags = hashlib.sha1(" ".join(cpu_flags()).encode()).hexdigest()[:10]
    install = hashlib.sha1(os.path.dirname(torch.__file__).encode()).hexdigest()[:8]
    return f"torch{torch.__version__}-{platform.machine()}-cpu{flags}-at{install}".replace("+", "_")


@functools.lru_cache(maxsize=1)
def cpu_ops():
    from torch.utils.cpp_extension import load

    from fastctx.default_model import fastctx_home

    build_dir = fastctx_home() / "torch_extensions" / f"attention_cpu-{_build_tag()}"
    build_dir.mkdir(parents=True, exist_ok=True)
    return load(name="fastctx_attention_cpu", sources=[str(s) for s in _SOURCES],
                build_directory=str(build_dir),
                extra_cflags=["-O3", "-march=native", "-fopenmp", "-fno-math-errno"],
                extra_ldflags=["-fopenmp"], verbose=bool(os.environ.get("FASTCTX_VERBOSE_BUILD")))
