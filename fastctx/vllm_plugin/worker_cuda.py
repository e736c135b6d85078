"""fastctx's vLLM CUDA worker (``FastctxWorker`` on vLLM's GPU ``Worker``), selected by fastctx's CUDA
platform when the fastctx backend is and ``--worker-cls`` is left at ``auto``."""

from __future__ import annotations

from vllm.v1.worker.gpu_worker import Worker

from fastctx.vllm_plugin.worker_base import FastctxWorker, FastctxWorkerExtension


class FastctxGPUWorker(FastctxWorker, Worker, FastctxWorkerExtension):
    pass
