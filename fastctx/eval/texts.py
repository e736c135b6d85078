"""Long natural text that exists offline on every machine: the standard library's sources.

Used for prompts in benchmarks and for teacher-forced fidelity checks, where
what matters is realistic attention patterns, not a task the model can solve.
"""

from __future__ import annotations

import importlib
import inspect

SOURCE_MODULES = ("inspect", "argparse", "typing", "dataclasses", "pathlib", "subprocess",
                  "tarfile", "email.message", "json.decoder", "logging")


def natural_text() -> str:
    return "\n\n".join(inspect.getsource(importlib.import_module(m)) for m in SOURCE_MODULES)


def token_ids(tokenizer, text: str) -> list[int]:
    """``text`` as the engine will see it inside a prompt: no BOS or other special tokens added."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_token_ids(tokenizer, num_tokens: int) -> list[int]:
    """The first ``num_tokens`` tokens of the offline text."""
    ids = token_ids(tokenizer, natural_text())
    if len(ids) < num_tokens:
        raise ValueError(f"only {len(ids)} tokens of offline text available, asked for {num_tokens}")
    return ids[:num_tokens]
