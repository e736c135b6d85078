"""The ``fastctx`` section of an engine's config, parsed and validated once.

vLLM users pass it as ``--additional-config '{"fastctx": {...}}'``; the same
dict shape will serve SGLang. Every error names the bad key or value and what
is allowed, because it surfaces as the reason a server refused to start.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping

SECTION = "fastctx"

# Attention methods a user can select with {"fastctx": {"attention": NAME}}.
ATTENTION_METHODS = ("dense",)


class FastctxConfigError(ValueError):
    """A bad ``fastctx`` config; the message says what to change."""


@dataclass(frozen=True)
class FastctxConfig:
    attention: str = "dense"

    @classmethod
    def from_section(cls, section: Any) -> "FastctxConfig":
        if section is None:
            return cls()
        if not isinstance(section, Mapping):
            raise FastctxConfigError(
                f"fastctx config must be a JSON object, e.g. "
                f'{{"{SECTION}": {{"attention": "dense"}}}}; got {type(section).__name__}')
        allowed = [f.name for f in fields(cls)]
        for key in section:
            if key not in allowed:
                raise FastctxConfigError(
                    f"fastctx config: unknown key {key!r}; allowed keys: {', '.join(allowed)}")
        attention = section.get("attention", cls.attention)
        if attention not in ATTENTION_METHODS:
            raise FastctxConfigError(
                f"fastctx config: attention={attention!r} is not a fastctx attention method; "
                f"choose one of: {', '.join(ATTENTION_METHODS)}")
        return cls(attention=attention)

    @classmethod
    def from_additional_config(cls, additional_config: Any) -> "FastctxConfig":
        section = additional_config.get(SECTION) if isinstance(additional_config, Mapping) else None
        return cls.from_section(section)


def has_section(additional_config: Any) -> bool:
    return isinstance(additional_config, Mapping) and SECTION in additional_config
