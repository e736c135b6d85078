"""The ``fastctx`` section of an engine's config, parsed and validated once.

vLLM users pass it as ``--additional-config '{"fastctx": {...}}'``; the same
dict shape will serve SGLang. Every error names the bad key or value and what
is allowed, because it surfaces as the reason a server refused to start.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from fastctx.kernels.flexprefill import FlexPrefillParams
from fastctx.kernels.minference import MInferenceParams

SECTION = "fastctx"

# Attention methods a user can select with {"fastctx": {"attention": NAME}}.
ATTENTION_METHODS = ("dense", "minference", "flexprefill")

# Prefill chunks whose context (cached prefix + chunk) is shorter than this
# stay dense: below it, estimating an index costs more than it saves on CPU.
DEFAULT_DENSE_BELOW = 2048


class FastctxConfigError(ValueError):
    """A bad ``fastctx`` config; the message says what to change."""


def _check_keys(section: Mapping, cls, where: str) -> None:
    allowed = [f.name for f in fields(cls)]
    for key in section:
        if key not in allowed:
            raise FastctxConfigError(
                f"fastctx config: unknown key {where}{key!r}; allowed keys: {', '.join(allowed)}")


def _params(cls, section: Any, name: str):
    """Build a knob dataclass from a user dict, naming the bad key or value."""
    if section is None:
        return cls()
    if not isinstance(section, Mapping):
        raise FastctxConfigError(f"fastctx config: {name} must be a JSON object of knobs, "
                                 f"got {type(section).__name__}")
    _check_keys(section, cls, f"{name}.")
    try:
        return cls(**section)
    except (TypeError, ValueError) as exc:
        raise FastctxConfigError(f"fastctx config: {name}: {exc}") from None


@dataclass(frozen=True)
class FastctxConfig:
    attention: str = "dense"
    dense_below: int = DEFAULT_DENSE_BELOW
    minference: MInferenceParams = field(default_factory=MInferenceParams)
    flexprefill: FlexPrefillParams = field(default_factory=FlexPrefillParams)

    @classmethod
    def from_section(cls, section: Any) -> "FastctxConfig":
        if section is None:
            return cls()
        if not isinstance(section, Mapping):
            raise FastctxConfigError(
                f"fastctx config must be a JSON object, e.g. "
                f'{{"{SECTION}": {{"attention": "dense"}}}}; got {type(section).__name__}')
        _check_keys(section, cls, "")
        attention = section.get("attention", cls.attention)
        if attention not in ATTENTION_METHODS:
            raise FastctxConfigError(
                f"fastctx config: attention={attention!r} is not a fastctx attention method; "
                f"choose one of: {', '.join(ATTENTION_METHODS)}")
        dense_below = section.get("dense_below", DEFAULT_DENSE_BELOW)
        if not isinstance(dense_below, int) or isinstance(dense_below, bool) or dense_below < 0:
            raise FastctxConfigError(
                f"fastctx config: dense_below={dense_below!r} must be a token count >= 0 "
                f"(default {DEFAULT_DENSE_BELOW}; 0 makes every prefill chunk sparse)")
        return cls(attention=attention, dense_below=dense_below,
                   minference=_params(MInferenceParams, section.get("minference"), "minference"),
                   flexprefill=_params(FlexPrefillParams, section.get("flexprefill"), "flexprefill"))

    @classmethod
    def from_additional_config(cls, additional_config: Any) -> "FastctxConfig":
        section = additional_config.get(SECTION) if isinstance(additional_config, Mapping) else None
        return cls.from_section(section)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def has_section(additional_config: Any) -> bool:
    return isinstance(additional_config, Mapping) and SECTION in additional_config
