"""Attention backends by name, for ``--attention-backend``."""

from __future__ import annotations

from kvtier.attention.backend import AttentionBackend
from kvtier.attention.paged import PagedAttentionBackend
from kvtier.errors import InvalidArgumentError

BACKENDS: dict[str, type[AttentionBackend]] = {cls.name: cls for cls in (PagedAttentionBackend,)}


def get_backend(name: str) -> AttentionBackend:
    if name not in BACKENDS:
        raise InvalidArgumentError("attention_backend", f"must be one of {', '.join(sorted(BACKENDS))}; got {name!r}")
    return BACKENDS[name]()
