"""SambaY without an engine: the config layout, differential attention, the reference model, and the
checkpoint writer (the Mamba ops are in test_mamba_kernels.py)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fastctx.cli import main as fastctx_main
from fastctx.kernels.diff_attention import differential_attention, lambda_init, visible_mask
from fastctx.models.sambay.checkpoint import _init_weights, parameter_count, write_checkpoint
from fastctx.models.sambay.config import Phi4FlashConfig, layer_kinds
from fastctx.models.sambay.reference import SambaYForCausalLM

TINY = dict(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=8, num_attention_heads=4,
            num_key_value_heads=2, sliding_window=5, mamba_d_state=4, bos_token_id=0, eos_token_id=0, pad_token_id=0)


def test_defaults_are_phi4_mini_flash_and_layout_is_sambay():
    cfg = Phi4FlashConfig()
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.head_dim, cfg.sliding_window, cfg.mamba_dt_rank, cfg.vocab_size) == (
        2560, 32, 40, 20, 64, 512, 160, 200064)
    kinds = layer_kinds(cfg)
    where = {kind: [i for i, k in enumerate(kinds) if k == kind] for kind in set(kinds)}
    assert where == {"mamba": list(range(0, 17, 2)), "sliding_attention": list(range(1, 16, 2)),
                     "full_attention": [17], "gmu": list(range(18, 31, 2)), "cross_attention": list(range(19, 32, 2))}
    assert cfg.layer_types == kinds and cfg.kv_layer == 17 and cfg.memory_layer == 16
    cfg.validate()


@pytest.mark.parametrize("change, message", [
    (dict(num_hidden_layers=6), "multiple of 4"),
    (dict(num_attention_heads=5, hidden_size=40), "even number"),
    (dict(num_key_value_heads=3, num_attention_heads=6, hidden_size=48), "even number"),
    (dict(mb_per_layer=3), "mb_per_layer"),
    (dict(hidden_act="gelu"), "silu"),
    (dict(sliding_window=0), "window"),
])
def test_invalid_configs_say_what_to_change(change, message):
    with pytest.raises(ValueError, match=message):
        Phi4FlashConfig(**{**TINY, **change}).validate()


def test_layer_types_come_from_the_layout_only():
    """vLLM reads layer_types to window only the sliding layers; a checkpoint's own spelling is not read."""
    cfg = Phi4FlashConfig(**TINY, layer_types=["full_attention"] * 8)
    assert cfg.layer_types == layer_kinds(cfg) and cfg.layer_types.count("sliding_attention") == 2


def _naive_diff_attention(q, k, v, lam, init, weight, scale, first, window):
    tq, heads, d = q.shape
    group = heads // k.shape[1]
    out = torch.zeros_like(q)
    mask = visible_mask(tq, k.shape[0], first, window)
    for pair in range(heads // 2):
        kv_pair = (2 * pair) // group // 2
        maps = []
        for which in (0, 1):
            s = (q[:, 2 * pair + which] @ k[:, 2 * kv_pair + which].t()) * scale
            maps.append(torch.softmax(s.masked_fill(~mask, float("-inf")), -1))
        vv = torch.cat([v[:, 2 * kv_pair], v[:, 2 * kv_pair + 1]], -1)
        diff = maps[0] @ vv - lam * (maps[1] @ vv)
        normed = diff / torch.sqrt(diff.pow(2).mean(-1, keepdim=True) + 1e-5) * weight * (1 - init)
        out[:, 2 * pair], out[:, 2 * pair + 1] = normed[:, :d], normed[:, d:]
    return out


@pytest.mark.parametrize("heads, kv_heads, window", [(4, 2, None), (8, 2, 3), (4, 4, None), (4, 2, 6)])
def test_differential_attention_matches_the_formula_and_chunks_agree(heads, kv_heads, window):
    g = torch.Generator().manual_seed(2)
    T, d = 11, 8
    q, k, v = (torch.randn(T, h, d, generator=g) for h in (heads, kv_heads, kv_heads))
    weight, lam, init = torch.rand(2 * d, generator=g) + 0.5, torch.tensor(0.3), lambda_init(3)
    args = dict(lam=lam, init=init, norm_weight=weight, scale=d ** -0.5, window=window)
    whole = differential_attention(q, k, v, first_position=0, **args)
    torch.testing.assert_close(whole, _naive_diff_attention(q, k, v, lam, init, weight, d ** -0.5, 0, window))
    # the last 4 queries as a chunk after a cached prefix, and as one decode query
    torch.testing.assert_close(differential_attention(q[7:], k, v, first_position=7, **args), whole[7:])
    torch.testing.assert_close(differential_attention(q[10:], k, v, first_position=10, **args), whole[10:])


def _tiny_model(seed=0, **change):
    config = Phi4FlashConfig(**{**TINY, **change})
    model = SambaYForCausalLM(config)
    _init_weights(model, seed)
    return model.eval()


def test_reference_is_causal_and_uses_the_shared_kv_and_memory():
    model = _tiny_model()
    ids = torch.randint(0, 300, (20,), generator=torch.Generator().manual_seed(3))
    full = model(ids)
    torch.testing.assert_close(model(ids[:13]), full[:13], atol=1e-5, rtol=1e-5)
    # The cross-decoder reads layer L/2+1's K/V: changing that layer's key projection changes its output.
    with torch.no_grad():
        model.model.layers[model.config.kv_layer].attn.Wqkv.weight[40:].mul_(2)
    assert not torch.allclose(model(ids)[-1], full[-1])


def test_gmu_reads_the_memory_layers_scan_output():
    model = _tiny_model()
    ids = torch.randint(0, 300, (12,), generator=torch.Generator().manual_seed(4))
    before = model(ids)
    with torch.no_grad():  # the memory layer's D enters m = y + D x, read by every GMU
        model.model.layers[model.config.memory_layer].attn.D.mul_(3)
    assert not torch.allclose(model(ids), before)


def test_checkpoint_has_phi4flash_names_and_reloads(tmp_path, model_dir):
    out = tmp_path / "sy"
    config = write_checkpoint(out, model_dir, seed=1, **{k: v for k, v in TINY.items() if k not in (
        "vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")})
    saved = json.loads((out / "config.json").read_text())
    assert saved["architectures"] == ["Phi4FlashForCausalLM"] and saved["model_type"] == "phi4flash"
    with open(f"{model_dir}/config.json") as f:
        assert saved["vocab_size"] == json.load(f)["vocab_size"]
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert {"model.layers.0.attn.A_log", "model.layers.0.attn.conv1d.weight", "model.layers.1.attn.Wqkv.bias",
            "model.layers.5.attn.inner_cross_attn.lambda_q1", "model.layers.5.attn.inner_cross_attn.subln.weight",
            "model.layers.6.attn.in_proj.weight", "model.layers.7.attn.Wqkv.weight",
            "model.final_layernorm.weight"} <= names
    assert "lm_head.weight" not in names  # tied
    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.get_slice("model.layers.7.attn.Wqkv.weight").get_shape() == [32, 32]  # cross layers: queries only
        assert sum(math.prod(f.get_slice(n).get_shape()) for n in names) == parameter_count(config)
    model = SambaYForCausalLM.from_pretrained(out)
    assert model(torch.tensor([1, 2, 3])).shape == (3, config.vocab_size)
    assert (out / "tokenizer.json").is_file()
    with pytest.raises(FileExistsError):
        write_checkpoint(out, model_dir)


def test_cli_init_writes_a_checkpoint_and_refuses_bad_layouts(tmp_path, model_dir, capsys):
    args = ["sambay", "init", "--layers", "4", "--hidden", "32", "--heads", "4", "--kv-heads", "2",
            "--intermediate", "64", "--window", "8"]
    assert fastctx_main([*args, "--out", str(tmp_path / "a")]) == 0
    assert "4 layers" in capsys.readouterr().out
    assert Phi4FlashConfig.from_pretrained(tmp_path / "a").sliding_window == 8
    assert fastctx_main([*args[:3], "6", *args[4:], "--out", str(tmp_path / "b")]) == 1
    assert "multiple of 4" in capsys.readouterr().err and not (tmp_path / "b").exists()
