"""Attention methods, one module each, and their registry.

``fastctx.methods.names("decode")`` lists what the ``decode`` config key accepts;
``config_reference()`` renders every method's knobs for the docs. Importing this
package registers the built-in methods.
"""

from fastctx.methods import dense, flexprefill, lserve, minference, streaming  # noqa: F401,E402  (registration)
from fastctx.methods.base import (
    PHASES,
    DecodeBatch,
    KnobError,
    Method,
    ModelShape,
    PrefillChunk,
    get,
    names,
    register,
    registered,
)

__all__ = ["PHASES", "DecodeBatch", "KnobError", "Method", "ModelShape", "PrefillChunk", "get", "names",
           "register", "registered"]
