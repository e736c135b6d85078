"""SGLang adapter: shares every algorithm in ``fastctx.kernels`` with the vLLM adapter (later issue)."""
