"""Attention backends by name, for ``--attention-backend``.

``paged`` is the reference (matmuls on gathered blocks, any device and dtype, every KV method); ``cpu`` adds the C++
decode kernel. ``auto``, the default, takes ``cpu`` on a CPU unless the engine's KV method acts inside decode
attention, and ``paged`` elsewhere; a ``cpu`` that cannot serve (no compiler, a GPU, such a KV method) falls back to
``paged`` with a log line that says why.
"""

from __future__ import annotations

import logging

import torch

from kvtier.attention.backend import AttentionBackend
from kvtier.attention.cpu import CpuPagedBackend
from kvtier.attention.paged import PagedAttentionBackend
from kvtier.errors import InvalidArgumentError

logger = logging.getLogger(__name__)
BACKENDS: dict[str, type[AttentionBackend]] = {cls.name: cls for cls in (PagedAttentionBackend, CpuPagedBackend)}
AUTO = "auto"


def check_backend_name(name: str) -> None:
    if name != AUTO and name not in BACKENDS:
        raise InvalidArgumentError("attention_backend", f"must be one of {', '.join([AUTO, *sorted(BACKENDS)])}; got {name!r}")


def get_backend(name: str, device: torch.device | None = None, kv_method: str | None = None) -> AttentionBackend:
    """The backend ``name`` asks for on ``device``; ``kv_method``: the name of an engine KV method that acts inside decode
    attention (it needs the reference path)."""
    check_backend_name(name)
    if name == AUTO:
        name = CpuPagedBackend.name if device is None or device.type == "cpu" else PagedAttentionBackend.name
    if name == CpuPagedBackend.name:
        why = (f"the device is {device.type}" if device is not None and device.type != "cpu"
               else f"the KV method {kv_method!r} acts inside decode attention" if kv_method else None)
        if why is None:
            try:
                return CpuPagedBackend()
            except RuntimeError as e:
                why = str(e)
        logger.warning("attention backend: 'cpu' cannot serve here (%s); using the reference backend 'paged'", why)
        name = PagedAttentionBackend.name
    return BACKENDS[name]()
