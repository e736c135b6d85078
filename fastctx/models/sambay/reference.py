"""SambaY in plain PyTorch, engine-free: the numbers every engine port is checked against.

Module and parameter names are those of Phi-4-mini-flash's checkpoint, so its
``model.safetensors`` loads with ``load_state_dict``. One sequence at a time,
whole (no cache): ``forward(ids) -> logits [T, vocab]``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fastctx.kernels.diff_attention import differential_attention, lambda_full, lambda_init
from fastctx.kernels.mamba import causal_conv1d, selective_scan_reference
from fastctx.models.sambay.config import CROSS, FULL, GMU, MAMBA, SLIDING, Phi4FlashConfig, layer_kinds


class Mlp(nn.Module):
    """SwiGLU MLP. ``linear`` builds the projections (engines pass their own linear layers)."""

    def __init__(self, config: Phi4FlashConfig, linear=nn.Linear):
        super().__init__()
        self.fc1 = linear(config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias)
        self.fc2 = linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x):
        gate, up = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(up * F.silu(gate))


class Mamba(nn.Module):
    """Mamba-1 mixer; ``forward`` also returns the pre-gate scan output (the GMU memory)."""

    def __init__(self, config: Phi4FlashConfig):
        super().__init__()
        inner, n = config.mamba_inner, config.mamba_d_state
        self.dt_rank, self.d_state = config.mamba_dt_rank, n
        self.in_proj = nn.Linear(config.hidden_size, 2 * inner, bias=config.mamba_proj_bias)
        self.conv1d = nn.Conv1d(inner, inner, config.mamba_d_conv, groups=inner, padding=config.mamba_d_conv - 1,
                                bias=config.mamba_conv_bias)
        self.x_proj = nn.Linear(inner, self.dt_rank + 2 * n, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, inner, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(inner, 1))
        self.D = nn.Parameter(torch.ones(inner))
        self.out_proj = nn.Linear(inner, config.hidden_size, bias=config.mamba_proj_bias)

    def forward(self, x):
        xs, z = self.in_proj(x).chunk(2, dim=-1)
        xs, _ = causal_conv1d(xs, self.conv1d.weight[:, 0], self.conv1d.bias)
        dt, B, C = self.x_proj(xs).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.softplus(self.dt_proj(dt))
        y, _ = selective_scan_reference(xs, delta, -torch.exp(self.A_log.float()), B, C, self.D)
        return self.out_proj(y * F.silu(z)), y


class Gmu(nn.Module):
    """Gated Memory Unit: ``out_proj(silu(in_proj(x)) * memory)``."""

    def __init__(self, config: Phi4FlashConfig, linear=nn.Linear):
        super().__init__()
        self.in_proj = linear(config.hidden_size, config.mamba_inner, bias=config.mamba_proj_bias)
        self.out_proj = linear(config.mamba_inner, config.hidden_size, bias=config.mamba_proj_bias)

    def forward(self, x, memory):
        return self.out_proj(F.silu(self.in_proj(x)) * memory)


class DiffAttentionParams(nn.Module):
    """A differential-attention layer's learned lambda vectors and sub-layer norm weight."""

    def __init__(self, head_dim: int, layer_index: int):
        super().__init__()
        self.init = lambda_init(layer_index)
        for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
            setattr(self, name, nn.Parameter(torch.zeros(head_dim)))
        self.subln = nn.RMSNorm(2 * head_dim, eps=1e-5)

    def lam(self) -> torch.Tensor:
        return lambda_full(self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2, self.init)


class Attention(nn.Module):
    """Differential attention; cross-attention layers project queries only."""

    def __init__(self, config: Phi4FlashConfig, layer_index: int, kind: str):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                    config.head_dim)
        self.kind = kind
        self.window = config.sliding_window if kind == SLIDING else None
        width = self.heads * self.head_dim + (0 if kind == CROSS else 2 * self.kv_heads * self.head_dim)
        self.Wqkv = nn.Linear(config.hidden_size, width, bias=True)
        self.out_proj = nn.Linear(self.heads * self.head_dim, config.hidden_size, bias=True)
        self.inner_cross_attn = DiffAttentionParams(self.head_dim, layer_index)

    def forward(self, x, shared_kv=None):
        t = x.shape[0]
        proj = self.Wqkv(x)
        q = proj[:, :self.heads * self.head_dim].view(t, self.heads, self.head_dim)
        if self.kind == CROSS:
            k, v = shared_kv
        else:
            k, v = proj[:, self.heads * self.head_dim:].view(t, 2, self.kv_heads, self.head_dim).unbind(1)
        p = self.inner_cross_attn
        out = differential_attention(q, k, v, lam=p.lam(), init=p.init, norm_weight=p.subln.weight,
                                     scale=self.head_dim ** -0.5, first_position=0, window=self.window)
        return self.out_proj(out.reshape(t, -1)), (k, v)


class DecoderLayer(nn.Module):
    def __init__(self, config: Phi4FlashConfig, layer_index: int, kind: str):
        super().__init__()
        self.kind = kind
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = Mlp(config)
        if kind == MAMBA:
            self.attn = Mamba(config)
        elif kind == GMU:
            self.attn = Gmu(config)
        else:
            self.attn = Attention(config, layer_index, kind)


class SambaYModel(nn.Module):
    def __init__(self, config: Phi4FlashConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i, kind) for i, kind in enumerate(layer_kinds(config)))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class SambaYForCausalLM(nn.Module):
    def __init__(self, config: Phi4FlashConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.model = SambaYModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=config.lm_head_bias)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        h = self.model.embed_tokens(ids)
        memory = shared_kv = None
        for i, layer in enumerate(self.model.layers):
            x = layer.input_layernorm(h)
            if layer.kind == MAMBA:
                out, y = layer.attn(x)
                if i == cfg.memory_layer:
                    memory = y
            elif layer.kind == GMU:
                out = layer.attn(x, memory)
            else:
                out, kv = layer.attn(x, shared_kv)
                if layer.kind == FULL:
                    shared_kv = kv
            h = h + out
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.lm_head(self.model.final_layernorm(h))

    @torch.no_grad()
    def greedy(self, ids: list[int], new_tokens: int) -> list[int]:
        """Greedy continuation by full re-computation (slow, exact)."""
        seq = list(ids)
        for _ in range(new_tokens):
            seq.append(int(self(torch.tensor(seq))[-1].argmax()))
        return seq[len(ids):]

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32) -> SambaYForCausalLM:
        from safetensors.torch import load_file

        path = Path(path)
        model = cls(Phi4FlashConfig.from_pretrained(path))
        state = {}
        for file in sorted(path.glob("*.safetensors")):
            state.update(load_file(file))
        if model.config.tie_word_embeddings:
            state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
        model.load_state_dict(state, strict=True)
        return model.to(dtype).eval()
