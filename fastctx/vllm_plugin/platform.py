"""A CPU platform that honours ``--attention-backend CUSTOM``.

vLLM's stock ``CpuPlatform`` logs "Cannot use CUSTOM backend on CPU" and runs
its own kernel. ``detect.cpu`` (a ``vllm.platforms`` entry point) activates this
subclass exactly where vLLM would have picked the plain CPU platform, so on a
GPU machine nothing changes. When the fastctx backend is selected it also picks
fastctx's worker (which tells the backend which requests a batch holds and when
they finish), and it validates the ``fastctx`` section of
``--additional-config`` while the config is built, so a bad key stops the
server before any engine process starts.
"""

from __future__ import annotations

from vllm.logger import init_logger
from vllm.platforms.cpu import CpuPlatform
from vllm.v1.attention.backends.registry import AttentionBackendEnum

from fastctx.vllm_plugin import ATTENTION_BACKEND, WORKER_CLS
from fastctx.vllm_plugin.checks import needs_worker, validate

# Under the "vllm" logger tree so messages follow vLLM's own log config.
logger = init_logger("vllm.fastctx." + __name__.rsplit(".", 1)[-1])


class FastctxCpuPlatform(CpuPlatform):
    @classmethod
    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None) -> str:
        if (selected_backend == AttentionBackendEnum.CUSTOM
                and not attn_selector_config.use_mla and not attn_selector_config.use_sparse):
            logger.info_once("fastctx: --attention-backend CUSTOM -> %s", ATTENTION_BACKEND)
            return ATTENTION_BACKEND
        return super().get_attn_backend_cls(selected_backend, attn_selector_config, num_heads)

    @classmethod
    def check_and_update_config(cls, vllm_config) -> None:
        parallel = vllm_config.parallel_config
        if (vllm_config.attention_config.backend == AttentionBackendEnum.CUSTOM or needs_worker(vllm_config)) \
                and parallel.worker_cls == "auto":
            parallel.worker_cls = WORKER_CLS
        super().check_and_update_config(vllm_config)
        validate(vllm_config)
