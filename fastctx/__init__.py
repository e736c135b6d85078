"""fastctx: long-context inference methods as plugins for stock vLLM and SGLang."""

__version__ = "0.1.0"
