"""The environment vLLM's CPU build reads its engine settings from, matched to kvtier's: the KV budget
(``VLLM_CPU_KVCACHE_SPACE``, whole GiB) and OpenMP threads bound to the cores this process may use."""

from __future__ import annotations

import os


def vllm_cpu_env(kv_cache_gib: float) -> dict[str, str]:
    if not float(kv_cache_gib).is_integer():
        raise SystemExit(f"--kv-cache-gib must be a whole number of GiB for vLLM (VLLM_CPU_KVCACHE_SPACE), got {kv_cache_gib}")
    cores = sorted(os.sched_getaffinity(0))
    bind = f"{cores[0]}-{cores[-1]}" if len(cores) > 1 else str(cores[0])
    return {"VLLM_CPU_KVCACHE_SPACE": str(int(kv_cache_gib)), "VLLM_CPU_OMP_THREADS_BIND": bind}
