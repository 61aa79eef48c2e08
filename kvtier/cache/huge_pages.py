"""Zeroed CPU tensors backed by transparent huge pages where the kernel offers them (Linux, THP in ``madvise`` or
``always`` mode).

A paged KV cache is read a block at a time from anywhere in a pool of gigabytes: with 4 KiB pages every block a
decode step reads is a TLB miss (one block of one KV head is one page). Asking for 2 MiB pages before the pool is
first touched lets the TLB cover the whole pool: on a 2-core Xeon the CPU decode kernel reads 256 sequences' scattered
blocks at 18.4 GB/s instead of 14.2 (``benchmarks/decode_kernel.py``). Elsewhere, and for pinned memory, this is
``torch.zeros``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

import torch

MADV_HUGEPAGE = 14
HUGE_PAGE = 2 << 20


@functools.cache
def _madvise() -> ctypes._CFuncPtr | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return fn


def zeros(*shape: int, dtype: torch.dtype, device: torch.device, pin_memory: bool = False) -> torch.Tensor:
    """``torch.zeros(*shape, dtype, device, pin_memory)``; a CPU tensor of at least one huge page that is not pinned is
    advised onto huge pages before its first touch (a refusal by the kernel leaves ordinary pages)."""
    madvise = _madvise()
    if device.type != "cpu" or pin_memory or madvise is None:
        return torch.zeros(*shape, dtype=dtype, device=device, pin_memory=pin_memory)
    t = torch.empty(*shape, dtype=dtype)
    start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    first = (start + HUGE_PAGE - 1) // HUGE_PAGE * HUGE_PAGE
    if end - first >= HUGE_PAGE:
        madvise(first, (end - first) // HUGE_PAGE * HUGE_PAGE, MADV_HUGEPAGE)
    return t.zero_()
