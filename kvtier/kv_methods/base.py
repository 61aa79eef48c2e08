"""The KV-method interface: what a method decides about a sequence's cache, and its configuration.

Like kvpress's presses, a method is a small class with a dataclass config; unlike a press it acts on the
engine's paged cache, so what it evicts goes back to the pool. The engine asks it at fixed points of a
sequence's life and does the cache work itself (compaction, block tables, copy-on-write), so a method only
scores and chooses. Hooks arrive with the methods that need them: after prefill (evict) is the first.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from kvtier.errors import InvalidArgumentError


@dataclass(frozen=True)
class KVMethodConfig:
    """``budget``: the tokens each layer and KV head keeps, as a fraction of the context in (0, 1] or a whole number
    of tokens >= 1 (kvpress's ``compression_ratio`` is 1 - budget)."""

    budget: float | int = 1.0

    def __post_init__(self) -> None:
        b = self.budget
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not (0 < b <= 1 or (b >= 1 and float(b).is_integer())):
            raise InvalidArgumentError("kv_method_config.budget", f"must be a fraction of the context in (0, 1] or a whole number of tokens >= 1, got {b!r}")

    def kept(self, context: int) -> int:
        """Tokens kept of a ``context``-token cache: a fraction rounds down as kvpress does (at least 1), a token count
        is capped at the context."""
        if isinstance(self.budget, float) and self.budget <= 1:
            return max(1, math.floor(context * self.budget))
        return min(context, int(self.budget))


@dataclass(frozen=True)
class PromptCache:
    """What a method may read of a sequence whose prompt is all in the cache: its size, each layer's prompt keys
    (after RoPE) and the queries (after RoPE) of the prompt's last ``KVMethod.window`` tokens."""

    num_tokens: int
    num_layers: int
    num_kv_heads: int
    keys: Callable[[int], torch.Tensor]  # layer -> [kv_heads, num_tokens, head_dim]
    window_queries: Callable[[int], torch.Tensor]  # layer -> [min(window, num_tokens), heads, head_dim]


class KVMethod(ABC):
    """One KV-cache method; the engine builds one per engine from its config."""

    name: ClassVar[str]
    config_class: ClassVar[type[KVMethodConfig]] = KVMethodConfig

    def __init__(self, config: KVMethodConfig) -> None:
        self.config = config

    @property
    def window(self) -> int:
        """How many of the prompt's last queries ``after_prefill`` reads; the engine keeps them during the prefill."""
        return 0

    @abstractmethod
    def after_prefill(self, prompt: PromptCache) -> torch.Tensor | None:
        """The prompt positions each layer and KV head keeps once the whole prompt is in the cache, as
        [num_layers, num_kv_heads, kept] ascending (the same count everywhere); None keeps them all."""
