"""vLLM adapter: registration only; the algorithms live in ``fastctx.kernels``.

``register`` is the ``vllm.general_plugins`` entry point. vLLM calls it in
every process it starts (API server, EngineCore, workers), so it must be cheap
and idempotent and must not change stock behaviour: fastctx only acts when the
user selects it with ``--attention-backend CUSTOM``.
"""

from __future__ import annotations

ATTENTION_BACKEND = "fastctx.vllm_plugin.attention.FastctxCPUAttentionBackend"

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CUSTOM, ATTENTION_BACKEND)
    _registered = True
