"""KV methods by name, and building one from ``--kv-method`` / ``--kv-method-config``."""

from __future__ import annotations

import dataclasses
import json

from kvtier.errors import InvalidArgumentError
from kvtier.kv_methods.base import KVMethod
from kvtier.kv_methods.h2o import H2O
from kvtier.kv_methods.kcache import KCache
from kvtier.kv_methods.mpcache import MPCache
from kvtier.kv_methods.quest import Quest
from kvtier.kv_methods.snapkv import SnapKV
from kvtier.kv_methods.streaming_llm import StreamingLLM

NONE = "none"  # the full cache: no method object, nothing to pay
KV_METHODS: dict[str, type[KVMethod]] = {m.name: m for m in (StreamingLLM, H2O, SnapKV, Quest, KCache, MPCache)}


def parse_config(config: dict | str | None) -> dict:
    """A method config as a dict, from a dict, a JSON object string (the CLI's), or None."""
    if config is None:
        return {}
    if isinstance(config, str):
        try:
            config = json.loads(config)
        except json.JSONDecodeError as e:
            raise InvalidArgumentError("kv_method_config", f"must be a JSON object, got {config!r} ({e.msg})") from None
    if not isinstance(config, dict):
        raise InvalidArgumentError("kv_method_config", f"must be a JSON object (a dict), got {config!r}")
    return config


def build_method(name: str, config: dict | str | None) -> KVMethod | None:
    """The method ``name`` with ``config`` checked field by field; None for ``none``."""
    if name == NONE:
        if parse_config(config):
            raise InvalidArgumentError("kv_method_config", "must be empty when kv_method is 'none'")
        return None
    if name not in KV_METHODS:
        raise InvalidArgumentError("kv_method", f"must be one of {', '.join([NONE, *KV_METHODS])}; got {name!r}")
    method = KV_METHODS[name]
    fields = {f.name for f in dataclasses.fields(method.config_class)}
    values = parse_config(config)
    unknown = sorted(set(values) - fields)
    if unknown:
        raise InvalidArgumentError("kv_method_config", f"{name} takes {', '.join(sorted(fields))}; unknown: {', '.join(unknown)}")
    return method(method.config_class(**values))
