"""SambaY (decoder-hybrid-decoder, Phi-4-mini-flash layout): config, PyTorch reference, checkpoints."""

from fastctx.models.sambay.config import ARCHITECTURE, MODEL_TYPE, Phi4FlashConfig, layer_kinds

__all__ = ["ARCHITECTURE", "MODEL_TYPE", "Phi4FlashConfig", "layer_kinds"]
