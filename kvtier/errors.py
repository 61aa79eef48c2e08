"""Typed errors raised at kvtier's public entry points.

Every error that comes from bad input names the offending field, so callers (the CLI,
the HTTP server) can turn it into a precise message without parsing strings.
"""

from __future__ import annotations


class KvtierError(Exception):
    """Base class of every error kvtier raises on purpose."""


class InvalidArgumentError(KvtierError, ValueError):
    """An argument is outside its allowed range; ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class ModelNotFoundError(KvtierError, FileNotFoundError):
    """The model path does not exist or lacks a required file."""


class UnsupportedArchitectureError(KvtierError, ValueError):
    """The checkpoint's architecture is not one kvtier implements."""


class OutOfKVCacheError(KvtierError, RuntimeError):
    """The KV-cache budget cannot hold even one request of the configured shape."""


class MPCUnavailableError(KvtierError, RuntimeError):
    """Private decoding needs the MPC environment (SecretFlow SPU), which is not installed; the message says how to make it."""
