"""Attention backends by name, for ``--attention-backend``.

``paged`` is the reference (matmuls on gathered blocks, any device and dtype, every KV method); ``cpu`` adds the C++
decode kernel (which also does KCache's Top-N read), packed linears and fused elementwise kernels. ``auto``, the
default, takes ``cpu`` on a CPU and ``paged`` elsewhere. Another KV method that acts inside decode attention keeps
``cpu``'s model but its decode attention runs on the reference path, and a ``cpu`` that cannot serve (no compiler, a
GPU) falls back to ``paged``: each with a log line that says so.
"""

from __future__ import annotations

import logging

import torch

from kvtier.attention.backend import AttentionBackend
from kvtier.attention.cpu import CpuPagedBackend
from kvtier.attention.metadata import DecodeHooks
from kvtier.attention.paged import PagedAttentionBackend
from kvtier.errors import InvalidArgumentError

logger = logging.getLogger(__name__)
BACKENDS: dict[str, type[AttentionBackend]] = {cls.name: cls for cls in (PagedAttentionBackend, CpuPagedBackend)}
AUTO = "auto"


def check_backend_name(name: str) -> None:
    if name != AUTO and name not in BACKENDS:
        raise InvalidArgumentError("attention_backend", f"must be one of {', '.join([AUTO, *sorted(BACKENDS)])}; got {name!r}")


def get_backend(name: str, device: torch.device | None = None, kv_method: DecodeHooks | None = None) -> AttentionBackend:
    """The backend ``name`` asks for on ``device``; ``kv_method``: the engine's KV method where it acts inside decode
    attention (the reference path, unless its read is a plain ``value_selection`` the kernel does)."""
    check_backend_name(name)
    if name == AUTO:
        name = CpuPagedBackend.name if device is None or device.type == "cpu" else PagedAttentionBackend.name
    if name == CpuPagedBackend.name:
        why = f"the device is {device.type}" if device is not None and device.type != "cpu" else None
        if why is None:
            try:
                backend = CpuPagedBackend(decode_kernel=kv_method is None or kv_method.value_selection is not None)
            except RuntimeError as e:
                why = str(e)
            else:
                if not backend.decode_kernel:
                    logger.info("attention backend 'cpu': the KV method %r acts inside decode attention, so decode attention runs on the "
                                "reference path (the model's linears and elementwise kernels stay native)", kv_method.name)
                return backend
        logger.warning("attention backend: 'cpu' cannot serve here (%s); using the reference backend 'paged'", why)
        name = PagedAttentionBackend.name
    return BACKENDS[name]()
