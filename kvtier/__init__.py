"""kvtier: an LLM inference engine built around the KV cache.

Public names are imported lazily, so ``import kvtier.cache`` does not load the whole engine.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "LLM": "kvtier.entrypoints.llm",
    "EngineArgs": "kvtier.config",
    "SamplingParams": "kvtier.sampling_params",
    "BeamSearchParams": "kvtier.sampling_params",
    "RequestOutput": "kvtier.outputs",
    "CompletionOutput": "kvtier.outputs",
    "Logprob": "kvtier.outputs",
    "KvtierError": "kvtier.errors",
    "InvalidArgumentError": "kvtier.errors",
    "ModelNotFoundError": "kvtier.errors",
    "UnsupportedArchitectureError": "kvtier.errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'kvtier' has no attribute {name!r}")
