"""Write a random-weight SambaY checkpoint in Phi-4-mini-flash's format, for tests and benchmarks.

The directory is what a real Phi-4-mini-flash checkpoint holds: ``config.json``
(``Phi4FlashForCausalLM``, model_type ``phi4flash``), ``model.safetensors`` with
the checkpoint's parameter names (tied ``lm_head`` left out, ``A_log`` not
``A``), and a tokenizer: the embedded default model's (SmolLM2), whose
vocabulary size the config takes. Built under a temporary name and renamed
into place, so a half-written checkpoint is never loaded.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path

import torch

from fastctx.models.sambay.config import ARCHITECTURE, Phi4FlashConfig
from fastctx.models.sambay.reference import Mamba, SambaYForCausalLM

# `fastctx sambay init`'s default: SmolLM2-135M's parameter count (134.1M vs 134.5M) and vocabulary, so
# the two compare as served models; head_dim 64 (vLLM's CPU attention takes 32, 64, 80, ...); window 512
# and GQA 2 as in Phi-4-mini-flash.
INIT_DEFAULTS = dict(num_hidden_layers=32, hidden_size=512, intermediate_size=1536, num_attention_heads=8,
                     num_key_value_heads=4, sliding_window=512, mamba_d_state=16)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "chat_template.jinja", "generation_config.json")


def _init_weights(model: SambaYForCausalLM, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    std = model.config.initializer_range
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("layernorm.weight", "subln.weight")):
                p.fill_(1.0)
            elif name.endswith("layernorm.bias"):
                p.zero_()
            elif "lambda_" in name:
                p.normal_(0.0, 0.1, generator=generator)
            elif name.endswith((".A_log", ".D")) or ".dt_proj." in name:
                continue  # Mamba's own initialisation, set below
            elif name.endswith(".bias"):
                p.zero_()
            elif name == "model.embed_tokens.weight":
                # Fan-in-scaled linears and embeddings smaller than a layer's output keep the residual from
                # being the input embedding alone, so a random model's greedy tokens depend on the context
                # instead of echoing the last token.
                p.normal_(0.0, 0.25, generator=generator)
            else:
                p.normal_(0.0, max(std, p.shape[-1] ** -0.5), generator=generator)
        for module in model.modules():
            if isinstance(module, Mamba):
                # Mamba's dt init: softplus(bias) log-uniform in [1e-3, 1e-1].
                dt = torch.exp(torch.rand(module.dt_proj.bias.shape, generator=generator)
                               * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
                module.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
                bound = module.dt_rank ** -0.5
                module.dt_proj.weight.uniform_(-bound, bound, generator=generator)


def write_checkpoint(out: Path, tokenizer_dir: Path, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                     **config_overrides) -> Phi4FlashConfig:
    """A random SambaY checkpoint at ``out``: ``INIT_DEFAULTS`` updated by ``config_overrides`` (Phi4Flash
    config keys; the rest are Phi-4-mini-flash's)."""
    from safetensors.torch import save_file

    out, tokenizer_dir = Path(out), Path(tokenizer_dir)
    if out.exists():
        raise FileExistsError(f"{out} exists; choose another --out or remove it")
    base = json.loads((tokenizer_dir / "config.json").read_text())
    config = Phi4FlashConfig(vocab_size=base["vocab_size"], bos_token_id=base.get("bos_token_id"),
                             eos_token_id=base.get("eos_token_id"), pad_token_id=base.get("pad_token_id"),
                             architectures=[ARCHITECTURE], torch_dtype=str(dtype).removeprefix("torch."),
                             **{**INIT_DEFAULTS, **config_overrides})
    config.validate()
    torch.manual_seed(seed)
    model = SambaYForCausalLM(config)
    _init_weights(model, seed)
    state = {name: t.detach().to(dtype).contiguous() for name, t in model.state_dict().items()
             if not (config.tie_word_embeddings and name == "lm_head.weight")}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        config.save_pretrained(tmp)
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file():
                shutil.copy(tokenizer_dir / name, tmp / name)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return config


def parameter_count(config: Phi4FlashConfig) -> int:
    with torch.device("meta"):
        model = SambaYForCausalLM(config)
    return sum(p.numel() for p in model.parameters())
