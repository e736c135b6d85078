"""Where an SGLang server's fastctx config comes from.

SGLang has no free-form section for plugin settings (vLLM's ``--additional-config``),
so the ``fastctx`` section (the same JSON object as under vLLM's
``--additional-config '{"fastctx": {...}}'``) travels in the environment variable
``FASTCTX_SGLANG_CONFIG``; SGLang's scheduler processes inherit it. The plugin's
``--fastctx-config`` flag sets it from the command line. It is validated when the
plugin loads in the launching process, so a bad knob stops the server before the
model loads.
"""

from __future__ import annotations

import json
import os

from fastctx.config import FastctxConfig, FastctxConfigError

ENV = "FASTCTX_SGLANG_CONFIG"


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
