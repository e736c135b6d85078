"""A CPU platform that honours ``--attention-backend CUSTOM``.

vLLM's stock ``CpuPlatform`` logs "Cannot use CUSTOM backend on CPU" and runs
its own kernel. ``detect`` (a ``vllm.platforms`` entry point) activates this
subclass exactly where vLLM would have picked the plain CPU platform, so on a
GPU machine nothing changes. It also validates the ``fastctx`` section of
``--additional-config`` while the config is built, so a bad key stops the
server before any engine process starts.
"""

from __future__ import annotations

from vllm.logger import init_logger
from vllm.platforms.cpu import CpuPlatform
from vllm.v1.attention.backends.registry import AttentionBackendEnum

from fastctx.config import FastctxConfigError, FastctxConfig, has_section
from fastctx.vllm_plugin import ATTENTION_BACKEND

_STOCK_CPU = "vllm.platforms.cpu.CpuPlatform"

# Under the "vllm" logger tree so messages follow vLLM's own log config.
logger = init_logger("vllm.fastctx." + __name__.rsplit(".", 1)[-1])


def detect() -> str | None:
    from vllm.platforms import cpu_platform_plugin

    if cpu_platform_plugin() == _STOCK_CPU:
        return "fastctx.vllm_plugin.platform.FastctxCpuPlatform"
    return None


def validate(vllm_config) -> FastctxConfig:
    """The fastctx config of an engine, or FastctxConfigError."""
    extra = vllm_config.additional_config
    cfg = FastctxConfig.from_additional_config(extra)
    backend = vllm_config.attention_config.backend
    if has_section(extra) and backend != AttentionBackendEnum.CUSTOM:
        raise FastctxConfigError(
            "fastctx config given in --additional-config, but the fastctx attention backend "
            "is not selected: add --attention-backend CUSTOM")
    return cfg


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
        super().check_and_update_config(vllm_config)
        validate(vllm_config)
