"""Helpers shared by the benchmarks: offline natural-text prompts and engine setup."""

from __future__ import annotations

import inspect
import os

# Standard-library sources: long natural text that exists on every machine.
_SOURCE_MODULES = ["inspect", "argparse", "typing", "dataclasses", "pathlib", "subprocess",
                   "tarfile", "email.message", "json.decoder", "logging"]


def natural_text() -> str:
    import importlib

    return "\n\n".join(inspect.getsource(importlib.import_module(m)) for m in _SOURCE_MODULES)


def prompt_token_ids(tokenizer, num_tokens: int, offset_chars: int = 0) -> list[int]:
    ids = tokenizer(natural_text()[offset_chars:], add_special_tokens=False)["input_ids"]
    if len(ids) < num_tokens:
        raise ValueError(f"only {len(ids)} tokens of offline text available, asked for {num_tokens}")
    return ids[:num_tokens]


def set_engine_env(threads_bind: str | None) -> str:
    """Pin both engines to the same cores; returns the binding used."""
    if threads_bind is None:
        threads_bind = os.environ.get("VLLM_CPU_OMP_THREADS_BIND") or f"0-{os.cpu_count() - 1}"
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = threads_bind
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    return threads_bind


STOCK: dict = {}
DENSE = dict(attention_config={"backend": "CUSTOM"},
             additional_config={"fastctx": {"attention": "dense"}})
