"""Checks of an engine's fastctx settings, made while vLLM builds its config (on any platform), so a bad
key or an unsupported combination stops the server before any engine process starts."""

from __future__ import annotations

from vllm.utils.import_utils import resolve_obj_by_qualname
from vllm.v1.attention.backends.registry import AttentionBackendEnum

from fastctx.config import ENGINE, FastctxConfig, FastctxConfigError, has_section
from fastctx.vllm_plugin import CUDA_WORKER_CLS, WORKER_CLS
from fastctx.vllm_plugin.spectr import spectr_params, uses_spectr


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
    if (selected or needs_worker(vllm_config)) and worker not in (WORKER_CLS, CUDA_WORKER_CLS, "auto") \
            and not _is_fastctx_worker(worker):
        raise FastctxConfigError(
            f"fastctx config: --worker-cls {worker} is not fastctx's worker; the fastctx backend, the CacheBlend "
            f"connector and SpecTr need it (it names a batch's requests, frees their state and hands the connector the "
            f"model): drop --worker-cls or subclass {WORKER_CLS} (CPU) or {CUDA_WORKER_CLS} (CUDA)")
    return cfg


def cuda_problem(vllm_config, cfg: FastctxConfig) -> str | None:
    """What of fastctx's settings (``cfg``: the engine's validated config) the CUDA adapter does not run in
    this release, or None."""
    if needs_worker(vllm_config):
        return ("CacheBlend's connector and SpecTr run on vLLM's CPU engine only in this release; drop them "
                "from --kv-transfer-config / --speculative-config on CUDA")
    if cfg.decode != ENGINE and vllm_config.speculative_config is not None:
        return (f"decode method {cfg.decode!r} with speculative decoding: on CUDA vLLM's host copy of a "
                f"verifying request's length is an upper bound, so a decode method cannot read it; drop one")
    return None


def needs_worker(vllm_config) -> bool:
    """CacheBlend's connector and SpecTr's proposer reach the model and runner through fastctx's worker."""
    return _uses_blend(vllm_config) or uses_spectr(vllm_config)


def _uses_blend(vllm_config) -> bool:
    """fastctx's CacheBlend connector needs fastctx's worker (it hands the connector the model)."""
    from fastctx.vllm_plugin import BLEND_CONNECTOR

    kv = vllm_config.kv_transfer_config
    return kv is not None and (kv.kv_connector == BLEND_CONNECTOR or (kv.kv_connector_module_path or "").startswith(
        "fastctx."))


def _is_fastctx_worker(qualname: str) -> bool:
    from fastctx.vllm_plugin.worker_base import FastctxWorker

    cls = resolve_obj_by_qualname(qualname)
    return isinstance(cls, type) and issubclass(cls, FastctxWorker)
