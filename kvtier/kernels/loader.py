"""kvtier's C++ CPU kernels (``csrc/``: paged decode attention and the model's fused elementwise ops), compiled with
torch's extension tools the first time they are asked for.

Built per machine, not at pip install time: a build requirement on torch would pull the CUDA torch into pip's isolated
build, and the kernel is compiled for the CPU it runs on (``-march=native``), so the build folder's name carries the
CPU's flags. A machine without a compiler (or ninja) gets None and the reason, and the engine keeps the reference
backend.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
from pathlib import Path
from types import ModuleType

logger = logging.getLogger(__name__)
SOURCES = sorted((Path(__file__).parent / "csrc").glob("*.cpp"))


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _vector_flags(flags: set[str]) -> list[str]:
    """ATen's vector types use the machine's widest registers only where told which (its CPU_CAPABILITY macros)."""
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]
    if {"avx2", "fma"} <= flags:
        return ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return []


def _tag(cflags: list[str]) -> str:
    """A short hash of what the compiled code depends on: the machine, the compiler flags, the sources."""
    digest = hashlib.sha256((platform.machine() + " ".join(cflags) + "".join(p.read_text() for p in SOURCES)).encode())
    return digest.hexdigest()[:12]


@functools.cache
def load_kernels() -> tuple[ModuleType | None, str]:
    """(the compiled module, "") or (None, why not)."""
    try:
        from torch.utils.cpp_extension import load

        flags = _cpu_flags()
        cflags = ["-O3", "-march=native", "-fopenmp", *_vector_flags(flags)]
        tag = _tag(cflags + sorted(flags))
        build = Path(os.environ.get("KVTIER_EXTENSIONS_DIR", Path.home() / ".cache" / "kvtier" / "extensions")) / tag
        build.mkdir(parents=True, exist_ok=True)
        if not any(build.glob("*.so")):
            logger.info("compiling kvtier's CPU kernels into %s (once per machine, about 30 s)", build)
        module = load(name=f"kvtier_cpu_{tag}", sources=[str(p) for p in SOURCES], build_directory=str(build),
                      extra_cflags=cflags, extra_ldflags=["-fopenmp"], verbose=False)
        return module, ""
    except Exception as e:  # no compiler, no ninja, a failed build: all mean the reference backend
        return None, f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
