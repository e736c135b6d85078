"""A CPU platform that honours ``--attention-backend CUSTOM``.

vLLM's stock ``CpuPlatform`` logs "Cannot use CUSTOM backend on CPU" and runs
its own kernel. ``detect`` (a ``vllm.platforms`` entry point) activates this
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
from vllm.utils.import_utils import resolve_obj_by_qualname
from vllm.v1.attention.backends.registry import AttentionBackendEnum

from fastctx.config import FastctxConfig, FastctxConfigError, has_section
from fastctx.vllm_plugin import ATTENTION_BACKEND, WORKER_CLS, version_problem
from fastctx.vllm_plugin.spectr import spectr_params, uses_spectr

_STOCK_CPU = "vllm.platforms.cpu.CpuPlatform"

# Under the "vllm" logger tree so messages follow vLLM's own log config.
logger = init_logger("vllm.fastctx." + __name__.rsplit(".", 1)[-1])


def detect() -> str | None:
    from vllm.platforms import cpu_platform_plugin

    if cpu_platform_plugin() == _STOCK_CPU and version_problem() is None:
        return "fastctx.vllm_plugin.platform.FastctxCpuPlatform"
    return None


def validate(vllm_config) -> FastctxConfig:
    """The fastctx config of an engine, or FastctxConfigError."""
    extra = vllm_config.additional_config
    cfg = FastctxConfig.from_additional_config(extra)
    selected = vllm_config.attention_config.backend == AttentionBackendEnum.CUSTOM
    if has_section(extra) and not selected:
        raise FastctxConfigError(
            "fastctx config given in --additional-config, but the fastctx attention backend "
            "is not selected: add --attention-backend CUSTOM")
    if _uses_blend(vllm_config):
        from fastctx.cacheblend.params import BlendParams
        from fastctx.methods.base import KnobError

        try:
            BlendParams.from_dict(vllm_config.kv_transfer_config.kv_connector_extra_config)
        except KnobError as exc:
            raise FastctxConfigError(str(exc)) from None
    if uses_spectr(vllm_config):
        from fastctx.methods.base import KnobError

        try:
            spectr_params(vllm_config)
        except KnobError as exc:
            raise FastctxConfigError(str(exc)) from None
    worker = vllm_config.parallel_config.worker_cls
    if (selected or _needs_worker(vllm_config)) and worker not in (WORKER_CLS, "auto") \
            and not _is_fastctx_worker(worker):
        raise FastctxConfigError(
            f"fastctx config: --worker-cls {worker} is not fastctx's worker; the fastctx backend, the CacheBlend "
            f"connector and SpecTr need it (it names a batch's requests, frees their state and hands the connector the "
            f"model): drop --worker-cls or subclass {WORKER_CLS}")
    return cfg


def _needs_worker(vllm_config) -> bool:
    """CacheBlend's connector and SpecTr's proposer reach the model and runner through fastctx's worker."""
    return _uses_blend(vllm_config) or uses_spectr(vllm_config)


def _uses_blend(vllm_config) -> bool:
    """fastctx's CacheBlend connector needs fastctx's worker (it hands the connector the model)."""
    from fastctx.vllm_plugin import BLEND_CONNECTOR

    kv = vllm_config.kv_transfer_config
    return kv is not None and (kv.kv_connector == BLEND_CONNECTOR or (kv.kv_connector_module_path or "").startswith(
        "fastctx."))


def _is_fastctx_worker(qualname: str) -> bool:
    from fastctx.vllm_plugin.worker import FastctxCPUWorker

    cls = resolve_obj_by_qualname(qualname)
    return isinstance(cls, type) and issubclass(cls, FastctxCPUWorker)


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
        if (vllm_config.attention_config.backend == AttentionBackendEnum.CUSTOM or _needs_worker(vllm_config)) \
                and parallel.worker_cls == "auto":
            parallel.worker_cls = WORKER_CLS
        super().check_and_update_config(vllm_config)
        validate(vllm_config)
