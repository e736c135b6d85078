"""vLLM's CUDA platform with fastctx's worker and config checks when the fastctx backend is selected.

``detect.cuda`` (a ``vllm.platforms`` entry point) activates this subclass exactly where vLLM would have
picked its stock CUDA platform; without ``--attention-backend CUSTOM`` it behaves as that platform.
vLLM resolves ``CUSTOM`` itself on CUDA (``fastctx.vllm_plugin.register`` names the FlashAttention
adapter there), checking it like FlashAttention (head sizes, dtypes, compute capability).
"""

from __future__ import annotations

from vllm.platforms.cuda import CudaPlatform
from vllm.v1.attention.backends.registry import AttentionBackendEnum

from fastctx.config import FastctxConfigError
from fastctx.vllm_plugin import CUDA_WORKER_CLS
from fastctx.vllm_plugin.checks import cuda_problem, validate


class FastctxCudaPlatform(CudaPlatform):
    @classmethod
    def check_and_update_config(cls, vllm_config) -> None:
        selected = vllm_config.attention_config.backend == AttentionBackendEnum.CUSTOM
        if selected and vllm_config.parallel_config.worker_cls == "auto":
            vllm_config.parallel_config.worker_cls = CUDA_WORKER_CLS
        super().check_and_update_config(vllm_config)
        cfg = validate(vllm_config)
        problem = cuda_problem(vllm_config, cfg) if selected else None
        if problem:
            raise FastctxConfigError(f"fastctx config: {problem}")
