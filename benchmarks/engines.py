"""What the engine benchmarks share: the same engines, threads, dtype and prompts for every side.

Benchmarks run stock vLLM and fastctx engines side by side in one process run,
pinned to the same cores, with the same dtype and prompts, and say which machine
they ran on (CPU features are found at run time; hosts of one kind differ).
"""

from __future__ import annotations

import os
import platform

from fastctx.kernels._cpu_ext import cpu_features


def set_engine_env(threads_bind: str | None) -> str:
    """Pin every engine to the same cores; returns the binding used."""
    if threads_bind is None:
        threads_bind = os.environ.get("VLLM_CPU_OMP_THREADS_BIND") or f"0-{os.cpu_count() - 1}"
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = threads_bind
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    return threads_bind


def engine_kwargs(section: dict | None) -> dict:
    """LLM(...) arguments selecting fastctx with ``section`` (None: stock vLLM)."""
    if section is None:
        return {}
    return dict(attention_config={"backend": "CUSTOM"}, additional_config={"fastctx": section})


def build_engines(model: str, max_len: int, methods: dict, dtype: str = "float32", **common) -> dict:
    from vllm import LLM

    base = dict(model=model, dtype=dtype, enforce_eager=True, max_model_len=max_len, enable_prefix_caching=False,
                seed=0, worker_extension_cls="fastctx.vllm_plugin.worker.FastctxWorkerExtension")
    base.update(common)
    return {name: LLM(**base, **engine_kwargs(section)) for name, section in methods.items()}


def fast_dtype() -> str:
    """The dtype stock vLLM is fastest at on this CPU (see ``fast_engine_dtype``)."""
    from fastctx.kernels._cpu_ext import fast_engine_dtype

    return fast_engine_dtype()


def machine() -> dict:
    """The CPU this ran on, as found now."""
    name = platform.processor()
    try:
        with open("/proc/cpuinfo") as info:
            name = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), name)
    except OSError:
        pass
    return {"cpu": name, "cores": os.cpu_count(), "features": [f for f, on in cpu_features().items() if on]}
