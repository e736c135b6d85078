"""Phi-4-mini-flash's ``config.json`` (``Phi4FlashForCausalLM``), with the SambaY layer layout.

Defaults are Phi-4-mini-flash-reasoning's. With L layers (a multiple of 4):

- self-decoder, layers 0 .. L/2-1: Mamba on even layers, sliding-window attention on odd ones;
- layer L/2: Mamba whose pre-gate scan output is the memory the GMUs read;
- layer L/2+1: full attention, the only KV cache the cross-decoder reads;
- cross-decoder, layers L/2+2 ..: Gated Memory Units on even layers, cross-attention (queries only,
  K/V of layer L/2+1) on odd ones.

No positional encoding anywhere; all attention is differential.
"""

from __future__ import annotations

import math

from transformers import PretrainedConfig

ARCHITECTURE = "Phi4FlashForCausalLM"
MODEL_TYPE = "phi4flash"

MAMBA, SLIDING, FULL, GMU, CROSS = "mamba", "sliding_attention", "full_attention", "gmu", "cross_attention"


class Phi4FlashConfig(PretrainedConfig):
    model_type = MODEL_TYPE

    def __init__(self, vocab_size: int = 200064, hidden_size: int = 2560, intermediate_size: int = 10240,
                 num_hidden_layers: int = 32, num_attention_heads: int = 40, num_key_value_heads: int = 20,
                 hidden_act: str = "silu", layer_norm_eps: float = 1e-5, max_position_embeddings: int = 262144,
                 sliding_window: int = 512, mb_per_layer: int = 2, mamba_d_state: int = 16, mamba_d_conv: int = 4,
                 mamba_expand: int = 2, mamba_dt_rank: int | str = "auto", mamba_conv_bias: bool = True,
                 mamba_proj_bias: bool = False, mlp_bias: bool = False, lm_head_bias: bool = False,
                 initializer_range: float = 0.02, tie_word_embeddings: bool = True, bos_token_id: int = 199999,
                 eos_token_id: int = 199999, pad_token_id: int = 199999, layer_types: list[str] | None = None,
                 **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.hidden_act = hidden_act
        self.layer_norm_eps = layer_norm_eps
        self.max_position_embeddings = max_position_embeddings
        self.sliding_window = sliding_window
        self.mb_per_layer = mb_per_layer
        self.mamba_d_state = mamba_d_state
        self.mamba_d_conv = mamba_d_conv
        self.mamba_expand = mamba_expand
        self.mamba_dt_rank = math.ceil(hidden_size / 16) if mamba_dt_rank == "auto" else mamba_dt_rank
        self.mamba_conv_bias = mamba_conv_bias
        self.mamba_proj_bias = mamba_proj_bias
        self.mlp_bias = mlp_bias
        self.lm_head_bias = lm_head_bias
        self.initializer_range = initializer_range
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)
        # Per-layer kinds under the name vLLM reads: with it, ``sliding_window`` applies to the sliding
        # layers only instead of to every attention layer. Derived from the layout, which the layer count
        # fixes; a ``layer_types`` in config.json (other spellings) is not read.
        self.layer_types = layer_kinds(self)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def mamba_inner(self) -> int:
        return self.mamba_expand * self.hidden_size

    @property
    def kv_layer(self) -> int:
        """The full-attention layer whose KV the cross-decoder shares."""
        return self.num_hidden_layers // 2 + 1

    @property
    def memory_layer(self) -> int:
        """The Mamba layer whose scan output the GMUs read."""
        return self.num_hidden_layers // 2

    def problems(self) -> list[str]:
        """What makes this config unservable as SambaY, each with what to change."""
        out = []
        if self.num_hidden_layers < 4 or self.num_hidden_layers % 4:
            out.append(f"num_hidden_layers={self.num_hidden_layers}: SambaY needs a multiple of 4 (>= 4), so that "
                       "layer L/2 is a Mamba layer and L/2+1 the shared full-attention layer")
        if self.mb_per_layer != 2:
            out.append(f"mb_per_layer={self.mb_per_layer}: only 2 (Mamba on even layers) is the SambaY layout")
        if self.hidden_size % self.num_attention_heads:
            out.append(f"hidden_size={self.hidden_size} is not a multiple of num_attention_heads="
                       f"{self.num_attention_heads}")
        for name in ("num_attention_heads", "num_key_value_heads"):
            if getattr(self, name) % 2:
                out.append(f"{name}={getattr(self, name)}: differential attention pairs heads, use an even number")
        if self.num_key_value_heads and self.num_attention_heads % self.num_key_value_heads:
            out.append(f"num_attention_heads={self.num_attention_heads} is not a multiple of num_key_value_heads="
                       f"{self.num_key_value_heads}")
        if self.hidden_act != "silu":
            out.append(f"hidden_act={self.hidden_act!r}: only 'silu' (SwiGLU MLP) is implemented")
        if not self.sliding_window or self.sliding_window < 1:
            out.append(f"sliding_window={self.sliding_window}: the self-decoder's attention needs a window >= 1")
        return out

    def validate(self) -> None:
        problems = self.problems()
        if problems:
            raise ValueError("not a SambaY (Phi4Flash) config: " + "; ".join(problems))


def layer_kinds(config: Phi4FlashConfig) -> list[str]:
    half = config.num_hidden_layers // 2
    kinds = []
    for i in range(config.num_hidden_layers):
        if i % 2 == 0:
            kinds.append(MAMBA if i <= half else GMU)
        elif i < half:
            kinds.append(SLIDING)
        else:
            kinds.append(FULL if i == half + 1 else CROSS)
    return kinds
