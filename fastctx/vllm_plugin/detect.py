"""``vllm.platform_plugins`` entry points: fastctx's platform subclass exactly where vLLM would have
picked its stock CPU or CUDA platform (and none under another vLLM version). vLLM loads these in
every process, so this module imports nothing heavy."""

from __future__ import annotations

from fastctx.vllm_plugin import version_problem


def cpu() -> str | None:
    from vllm.platforms import cpu_platform_plugin

    if cpu_platform_plugin() == "vllm.platforms.cpu.CpuPlatform" and version_problem() is None:
        return "fastctx.vllm_plugin.platform.FastctxCpuPlatform"
    return None


def cuda() -> str | None:
    from vllm.platforms import cuda_platform_plugin

    if cuda_platform_plugin() == "vllm.platforms.cuda.CudaPlatform" and version_problem() is None:
        return "fastctx.vllm_plugin.platform_cuda.FastctxCudaPlatform"
    return None
