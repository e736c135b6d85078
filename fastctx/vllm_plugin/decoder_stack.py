"""A loaded vLLM model as CacheBlend's ``DecoderStack``: its own decoder layers, run one at a time.

Each layer runs its own forward (norms, QKV projection, RoPE, any q/k norms,
output projection, MLP: the model's code and weights); only the call to vLLM's
``Attention`` module is swapped, for the duration of the call, for the blend's
attention over the fused KV. That fits the decoder layers of Llama, Mistral,
Qwen2/3 and the models built like them (``model.layers[i].self_attn.attn``
called as ``attn(q, k, v)``); anything else is refused with the reason.
"""

from __future__ import annotations

import torch

from fastctx.cacheblend.blend import DecoderStack


class UnsupportedModel(ValueError):
    pass


class _Attend(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, q, k, v):
        return self.fn(q, k, v)


class VllmDecoderStack(DecoderStack):
    def __init__(self, model: torch.nn.Module):
        inner = getattr(model, "model", None)
        layers = getattr(inner, "layers", None)
        name = type(model).__name__
        if layers is None or not len(layers):
            raise UnsupportedModel(f"CacheBlend: {name} has no model.layers to run one by one")
        self._model, self._inner, self._layers = model, inner, list(layers)
        attn0 = self._check_layer(0)
        self.num_layers = len(self._layers)
        self.num_heads, self.num_kv_heads, self.head_dim = attn0.num_heads, attn0.num_kv_heads, attn0.head_size
        self.scale = float(attn0.impl.scale)
        self.dtype = next(model.parameters()).dtype
        for i in range(1, self.num_layers):
            self._check_layer(i)
        self._check_rotation()

    def _check_layer(self, i: int):
        layer = self._layers[i]
        sa = getattr(layer, "self_attn", None)
        attn = getattr(sa, "attn", None)
        if attn is None or not hasattr(sa, "rotary_emb") or not hasattr(attn, "impl"):
            raise UnsupportedModel(f"CacheBlend: layer {i} ({type(layer).__name__}) is not built as "
                                   "self_attn.{qkv_proj, rotary_emb, attn}; only such decoder layers can be blended")
        impl = attn.impl
        if getattr(impl, "sliding_window", None) not in (None, -1) or getattr(impl, "logits_soft_cap", 0) not in (
                None, 0) or getattr(impl, "alibi_slopes", None) is not None:
            raise UnsupportedModel(f"CacheBlend: layer {i} uses a sliding window, logit soft cap or ALiBi, which "
                                   "the blend's attention does not apply")
        return attn

    def _check_rotation(self) -> None:
        """Re-rotating stored K is exact only if this model's RoPE composes (R(a) R(b) = R(a + b)); check it
        on the model's own rotary module rather than assume it from the config."""
        g = torch.Generator().manual_seed(0)
        k = torch.randn(4, self.num_kv_heads * self.head_dim, generator=g).to(self.dtype)
        a, b = torch.tensor([3, 50, 700, 1]), torch.tensor([5, 9, 300, 4000])
        twice = self.rotate_keys(0, self.rotate_keys(0, k, a), b)
        once = self.rotate_keys(0, k, a + b)
        tol = 1e-3 if self.dtype == torch.float32 else 5e-2
        if not torch.allclose(twice.float(), once.float(), atol=tol, rtol=tol):
            raise UnsupportedModel("CacheBlend: this model's rotary embedding does not compose by position shifts, "
                                   "so stored keys cannot be moved to new positions")

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        inner = self._inner
        return inner.embed_input_ids(token_ids) if hasattr(inner, "embed_input_ids") else inner.embed_tokens(token_ids)

    def run_layer(self, layer, positions, hidden, residual, attend):
        sa = self._layers[layer].self_attn
        engine_attn = sa.attn
        sa.attn = _Attend(attend)
        try:
            return self._layers[layer](positions, hidden, residual)
        finally:
            sa.attn = engine_attn

    def logits(self, hidden: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """The model's final norm and head over the last layer's output."""
        out = self._inner.norm(hidden, residual) if residual is not None else self._inner.norm(hidden)
        return self._model.compute_logits(out[0] if isinstance(out, tuple) else out)

    def rotate_keys(self, layer: int, keys: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        rope = self._layers[layer].self_attn.rotary_emb
        moved, _ = rope.forward_native(shift, keys)  # out of place; the keys go in as the "query"
        # Some RoPE variants (YaRN) scale cos/sin by an mscale; one rotation already carries it.
        m = float(rope.cos_sin_cache[0, 0])
        return moved if abs(m - 1.0) < 1e-6 else moved / m

    @property
    def layer_names(self) -> list[str]:
        """vLLM's name of each layer's attention (the key of its paged cache)."""
        return [layer.self_attn.attn.layer_name for layer in self._layers]

    def attention(self, layer: int):
        """vLLM's attention module of a layer (its ``kv_cache`` is the layer's paged cache)."""
        return self._layers[layer].self_attn.attn

    def isa(self, layer: int) -> str | None:
        """The CPU paged-cache layout vLLM's backend chose for this layer."""
        return getattr(self._layers[layer].self_attn.attn, "isa", None)
