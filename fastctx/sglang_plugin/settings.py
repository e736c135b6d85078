"""Where an SGLang server's fastctx config comes from.

SGLang has no free-form section for plugin settings (vLLM's ``--additional-config``),
so the ``fastctx`` section (the same JSON object as under vLLM's
``--additional-config '{"fastctx": {...}}'``) travels in the environment variable
``FASTCTX_SGLANG_CONFIG``; SGLang's scheduler processes inherit it. The plugin's
``--fastctx-config`` flag sets it from the command line. It is validated when the
plugin loads in the launching process, so a bad knob stops the server before the
model loads. SpecTr's knobs (``--speculative-algorithm SPECTR``; vLLM's
``additional_config["fastctx_spectr"]``) travel the same way in ``FASTCTX_SGLANG_SPECTR``,
set by ``--fastctx-spectr``.
"""

from __future__ import annotations

import json
import os

from fastctx.config import FastctxConfig, FastctxConfigError
from fastctx.methods.base import KnobError
from fastctx.specdec.params import SpecTrParams

ENV = "FASTCTX_SGLANG_CONFIG"
SPECTR_ENV = "FASTCTX_SGLANG_SPECTR"


def parse(text: str | None) -> FastctxConfig:
    if not text:
        return FastctxConfig()
    try:
        section = json.loads(text)
    except json.JSONDecodeError as exc:
        raise FastctxConfigError(f"{ENV} / --fastctx-config is not JSON ({exc}); pass the fastctx section, "
                                 f'e.g. \'{{"attention": "flexprefill"}}\'') from None
    return FastctxConfig.from_section(section)


def runtime_config() -> FastctxConfig:
    return parse(os.environ.get(ENV))


def set_config(text: str | None) -> FastctxConfig:
    """Validates ``text`` and hands it to the processes this one starts."""
    config = parse(text)
    if text:
        os.environ[ENV] = text
    return config


def set_spectr(text: str | None) -> SpecTrParams:
    """Validates SpecTr's knobs and hands them to the processes this one starts."""
    params = spectr_params(text)
    if text:
        os.environ[SPECTR_ENV] = text
    return params


def spectr_params(text: str | None = None) -> SpecTrParams:
    """SpecTr's knobs from ``text`` (default: the environment), validated."""
    text = os.environ.get(SPECTR_ENV) if text is None else text
    try:
        raw = json.loads(text) if text else {}
    except json.JSONDecodeError as exc:
        raise KnobError(f"{SPECTR_ENV} / --fastctx-spectr is not JSON ({exc}); pass SpecTr's knobs, "
                        'e.g. \'{"chains": 4}\'') from None
    return SpecTrParams.from_dict(raw)
