"""The ``fastctx`` section of an engine's config, parsed and validated once.

vLLM users pass it as ``--additional-config '{"fastctx": {...}}'``; the same
dict shape serves SGLang. Two axes pick the methods, as MInference's
attn_type x kv_type: ``attention`` (prefill) and ``decode`` (``engine`` = the
engine's own kernel). Each method's knobs sit under its name. Allowed names come
from the method registry, so a new method needs no change here. Every error
names the bad key or value and what is allowed, because it surfaces as the
reason a server refused to start.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from fastctx import methods

SECTION = "fastctx"
ENGINE = "engine"  # decode: the engine's own kernel

# Prefill chunks whose context (cached prefix + chunk) is shorter than this
# stay dense: below it, estimating an index costs more than it saves on CPU.
DEFAULT_DENSE_BELOW = 2048
TOP_LEVEL = {
    "attention": ("dense", "prefill method: one of the methods with a prefill phase (below)"),
    "decode": (ENGINE, f"decode method: `{ENGINE}` (the engine's own kernel) or a method with a decode phase"),
    "dense_below": (DEFAULT_DENSE_BELOW, "prefill chunks whose context (cached prefix + chunk) is shorter stay "
                    "dense, as do chunks of fewer than 64 queries; methods cheap at any length (dense, streaming) "
                    "ignore it"),
}


class FastctxConfigError(ValueError):
    """A bad ``fastctx`` config; the message says what to change."""


def _knob_methods() -> list[str]:
    return [name for name, cls in methods.registered().items() if cls.Params is not None]


def _params(name: str, section: Any):
    """A method's knob dataclass from a user dict, naming the bad key or value."""
    cls = methods.get(name).Params
    if section is None:
        return cls()
    if not isinstance(section, Mapping):
        raise FastctxConfigError(f"fastctx config: {name} must be a JSON object of knobs, "
                                 f"got {type(section).__name__}")
    allowed = [f.name for f in fields(cls)]
    for key in section:
        if key not in allowed:
            raise FastctxConfigError(
                f"fastctx config: unknown key {name}.{key!r}; allowed keys: {', '.join(allowed)}")
    try:
        return cls(**section)
    except (methods.KnobError, TypeError) as exc:
        raise FastctxConfigError(f"fastctx config: {name}.{exc}") from None


@dataclass(frozen=True)
class FastctxConfig:
    attention: str = "dense"
    decode: str = ENGINE
    dense_below: int = DEFAULT_DENSE_BELOW
    knobs: tuple = ()  # ((method name, its knob dataclass), ...) for every method with knobs

    def __post_init__(self):
        if not self.knobs:
            object.__setattr__(self, "knobs", tuple((n, methods.get(n).Params()) for n in _knob_methods()))

    def __getattr__(self, name: str):
        """``cfg.minference`` is the MInference knobs."""
        if not name.startswith("_"):
            for method, params in self.__dict__.get("knobs", ()):
                if method == name:
                    return params
        raise AttributeError(name)

    def params(self, name: str):
        return getattr(self, name) if methods.get(name).Params is not None else None

    @classmethod
    def from_section(cls, section: Any) -> FastctxConfig:
        if section is None:
            return cls()
        if not isinstance(section, Mapping):
            raise FastctxConfigError(
                f"fastctx config must be a JSON object, e.g. "
                f'{{"{SECTION}": {{"attention": "dense"}}}}; got {type(section).__name__}')
        allowed = [*TOP_LEVEL, *_knob_methods()]
        for key in section:
            if key not in allowed:
                raise FastctxConfigError(f"fastctx config: unknown key {key!r}; allowed keys: {', '.join(allowed)}")
        attention = section.get("attention", cls.attention)
        if attention not in methods.names("prefill"):
            raise FastctxConfigError(
                f"fastctx config: attention={attention!r} is not a fastctx prefill method; "
                f"choose one of: {', '.join(methods.names('prefill'))}")
        decode = section.get("decode", ENGINE)
        if decode != ENGINE and decode not in methods.names("decode"):
            raise FastctxConfigError(
                f"fastctx config: decode={decode!r} is not a decode method; "
                f"choose one of: {', '.join([ENGINE, *methods.names('decode')])}")
        dense_below = section.get("dense_below", DEFAULT_DENSE_BELOW)
        if not isinstance(dense_below, int) or isinstance(dense_below, bool) or dense_below < 0:
            raise FastctxConfigError(
                f"fastctx config: dense_below={dense_below!r} must be a token count >= 0 "
                f"(default {DEFAULT_DENSE_BELOW}; 0 makes every prefill chunk sparse)")
        knobs = tuple((name, _params(name, section.get(name))) for name in _knob_methods())
        return cls(attention=attention, decode=decode, dense_below=dense_below, knobs=knobs)

    @classmethod
    def from_additional_config(cls, additional_config: Any) -> FastctxConfig:
        section = additional_config.get(SECTION) if isinstance(additional_config, Mapping) else None
        return cls.from_section(section)

    def as_dict(self) -> dict:
        return {"attention": self.attention, "decode": self.decode, "dense_below": self.dense_below,
                **{name: dataclasses.asdict(params) for name, params in self.knobs}}


def has_section(additional_config: Any) -> bool:
    return isinstance(additional_config, Mapping) and SECTION in additional_config


def config_reference() -> str:
    """The config reference as Markdown, generated from the registry (README embeds it)."""
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for key, (default, doc) in TOP_LEVEL.items():
        lines.append(f"| `{key}` | `{default}` | {doc} |")
    lines += ["", "| method | phases | what it does |", "|---|---|---|"]
    for name, cls in methods.registered().items():
        lines.append(f"| `{name}` | {', '.join(cls.phases)} | {cls.summary} |")
    lines += ["", "| knob | default | meaning |", "|---|---|---|"]
    for name, cls in methods.registered().items():
        for f in fields(cls.Params) if cls.Params else ():
            default = "null" if f.default is None else f.default
            lines.append(f"| `{name}.{f.name}` | `{default}` | {f.metadata.get('doc', '')} |")
    from fastctx.cacheblend.params import BlendParams

    lines += ["", "CacheBlend connector (`--kv-transfer-config` `kv_connector_extra_config`):", "",
              "| knob | default | meaning |", "|---|---|---|"]
    for f in fields(BlendParams):
        default = "null" if f.default is None else json.dumps(f.default)
        lines.append(f"| `{f.name}` | `{default}` | {f.metadata.get('doc', '').replace('|', '/')} |")
    return "\n".join(lines) + "\n"
