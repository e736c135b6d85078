"""fastctx's vLLM CPU worker (``FastctxWorker`` on vLLM's ``CPUWorker``).

The fastctx CPU platform selects ``FastctxCPUWorker`` whenever the fastctx
backend is (``--attention-backend CUSTOM``), CacheBlend's connector or SpecTr
is, and ``--worker-cls`` is left at ``auto``.
"""

from __future__ import annotations

from vllm.v1.worker.cpu_worker import CPUWorker

from fastctx.vllm_plugin.worker_base import FastctxWorker, FastctxWorkerExtension, loaded_model

__all__ = ["FastctxCPUWorker", "FastctxWorker", "FastctxWorkerExtension", "loaded_model"]


class FastctxCPUWorker(FastctxWorker, CPUWorker, FastctxWorkerExtension):
    pass
