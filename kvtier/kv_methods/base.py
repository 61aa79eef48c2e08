"""The KV-method interface: what a method decides about a sequence's cache, and its configuration.

Like kvpress's presses, a method is a small class with a dataclass config; unlike a press it acts on the
engine's paged cache, so what it evicts goes back to the pool. The engine asks it at fixed points of a
sequence's life and does the cache work itself (compaction, block tables, copy-on-write), so a method only
scores and chooses:

- ``after_prefill``: once the prompt is in the cache, the positions each layer and KV head keeps (StreamingLLM,
  SnapKV, H2O);
- ``select_blocks``: inside each decode step's attention, the blocks each KV head reads (Quest, MPCache);
- ``observe_decode``: inside each decode step's attention, the probabilities each cache slot received (H2O);
- ``read_values``: inside each decode step's attention, the output from the probabilities, reading only the V rows it
  chooses (KCache);
- ``after_decode``: after each decode step, the cache slots to keep (H2O's eviction as the cache grows).

What a method keeps beside K and V (``slot_stats``, ``block_summary``, ``value_sums``, V in the host tier) is allocated, moved and
accounted with them, in the layers it acts in (``cache_state``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from kvtier.attention.metadata import BlockSelection, DecodeGroup, ValueSelection
from kvtier.cache.layer_cache import LayerCache
from kvtier.cache.specs import MethodState
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
class DenseLayersConfig(KVMethodConfig):
    """``dense_layers``: how many of the model's first layers keep and read their whole cache, the method acting in the
    rest (Quest's evaluation leaves its first two layers dense, ArkVale's ``n_unlimited_layers`` does the same)."""

    dense_layers: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.dense_layers, bool) or not isinstance(self.dense_layers, int) or self.dense_layers < 0:
            raise InvalidArgumentError("kv_method_config.dense_layers", f"must be a whole number of layers >= 0, got {self.dense_layers!r}")

    def method_layers(self, num_layers: int) -> range:
        """The layers after the dense ones; at least one must be left."""
        if self.dense_layers >= num_layers:
            raise InvalidArgumentError("kv_method_config.dense_layers",
                                       f"must be in [0, {num_layers - 1}] for a model of {num_layers} layers, got {self.dense_layers}")
        return range(self.dense_layers, num_layers)


ALL_QUERIES = 1 << 62  # a ``KVMethod.window`` that reads every query of the prompt


@dataclass(frozen=True)
class PromptCache:
    """What a method may read of a sequence whose prompt is all in the cache: its size, each layer's prompt keys
    (after RoPE), the queries (after RoPE) of the prompt's last ``KVMethod.window`` tokens, and where to store a
    method's per-token numbers (``slot_stats``) for the prompt's tokens."""

    num_tokens: int
    num_layers: int
    num_kv_heads: int
    keys: Callable[[int], torch.Tensor]  # layer -> [kv_heads, num_tokens, head_dim]
    window_queries: Callable[[int], torch.Tensor]  # layer -> [min(window, num_tokens), heads, head_dim]
    write_stats: Callable[[int, torch.Tensor], None]  # (layer, [kv_heads, num_tokens] fp32)


@dataclass(frozen=True)
class DecodeCache:
    """What a method may read of a decoding sequence's cache: the tokens it has computed, the cache slots they take
    (fewer once some were evicted), and per layer the per-slot numbers (``slot_stats``) and each slot's position."""

    num_tokens: int
    num_slots: int
    num_layers: int
    num_kv_heads: int
    block_size: int
    stats: Callable[[int], torch.Tensor]  # layer -> [kv_heads, num_slots] fp32
    positions: Callable[[int], torch.Tensor]  # layer -> [kv_heads, num_slots]: the position of the token in each slot


class KVMethod:
    """One KV-cache method; the engine builds one per engine from its config."""

    name: ClassVar[str]
    config_class: ClassVar[type[KVMethodConfig]] = KVMethodConfig
    slot_stats: ClassVar[bool] = False  # keeps an fp32 number per token and KV head beside K and V
    block_summary: ClassVar[bool] = False  # keeps each block's elementwise key min and max
    host_values: ClassVar[bool] = False  # keeps V in the host tier
    value_sums: bool = False  # keeps each block's sum of values beside K
    decode_hooks: ClassVar[bool] = False  # acts inside decode attention (``select_blocks``, ``observe_decode``, ``read_values``)
    observes_decode: ClassVar[bool] = False
    reads_values: ClassVar[bool] = False  # computes the output from the probabilities itself (``read_values``)
    value_selection: ValueSelection | None = None  # ``read_values`` as a plain Top-N read that a backend's kernel can do

    def __init__(self, config: KVMethodConfig) -> None:
        self.config = config

    def layers(self, num_layers: int) -> range:
        """The layers the method acts in; the others keep and read their whole cache."""
        return range(num_layers)

    def cache_state(self, num_layers: int) -> MethodState:
        """What the cache keeps for the method, and in which layers."""
        return MethodState(frozenset(self.layers(num_layers)), self.slot_stats, self.block_summary, self.host_values, self.value_sums)

    @property
    def window(self) -> int:
        """How many of the prompt's last queries ``after_prefill`` reads (``ALL_QUERIES``: all); the engine keeps them
        during the prefill."""
        return 0

    def after_prefill(self, prompt: PromptCache) -> torch.Tensor | None:
        """The prompt positions each layer and KV head keeps once the whole prompt is in the cache, as
        [num_layers, num_kv_heads, kept] ascending (the same count everywhere); None keeps them all."""
        return None

    def select_blocks(self, q: torch.Tensor, cache: LayerCache, group: DecodeGroup) -> BlockSelection | None:
        """Before one layer's decode attention over ``group`` (queries q [rows, heads, head_dim]): the blocks each KV
        head reads; None reads every block."""
        return None

    def observe_decode(self, cache: LayerCache, head: int, slots: torch.Tensor, probs: torch.Tensor) -> None:
        """After one layer's decode attention for KV ``head``: ``probs`` [rows, group's query heads, keys] (fp32) over
        the cache ``slots`` [rows, keys] it read (0 where a row sees no key)."""

    def read_values(self, probs: torch.Tensor, cache: LayerCache, slots: torch.Tensor, context_lens: torch.Tensor) -> torch.Tensor:
        """One layer's decode attention output, from ``probs`` [rows, kv_heads, group's query heads, keys] (fp32, 0 where a
        row sees no key) over the cache ``slots`` [rows, keys] they came from, each row having ``context_lens`` [rows]
        keys, reading rows of the layer's values ``cache.v`` [kv_heads, cache slots, head_dim] (wherever they live):
        [rows, kv_heads, group's query heads, head_dim] in fp32. Called only by a method with ``reads_values``, which
        selects no blocks."""
        raise NotImplementedError

    def after_decode(self, cache: DecodeCache) -> torch.Tensor | None:
        """After a decode step, the cache slots each layer and KV head keeps, [num_layers, num_kv_heads, kept]
        ascending; None keeps them all."""
        return None

    def check_engine(self, block_size: int) -> None:
        """Raise InvalidArgumentError if the method cannot run on an engine with this ``block_size``."""

    def rows_read(self, num_slots: int, num_tokens: int, block_size: int, group_size: int) -> tuple[int, int]:
        """(K rows, V rows) one decode query reads per layer and KV head from a cache of ``num_slots`` (of the ``num_tokens``
        it has computed), ``group_size`` query
        heads sharing the KV head (what the method reads beside them counted in K rows): a step's memory traffic."""
        return num_slots, num_slots


def prompt_attention(queries: torch.Tensor, keys: torch.Tensor, first: int) -> torch.Tensor:
    """The causal attention of the prompt queries at positions ``first`` .. ``first + w - 1`` over the prompt's keys:
    queries [w, H, D], keys [Hkv, n, D] -> probabilities [Hkv, H / Hkv, w, n] in fp32, the query heads grouped under
    the KV head they share."""
    w, heads, dim = queries.shape
    kv_heads, n, _ = keys.shape
    q = queries.float().view(w, kv_heads, heads // kv_heads, dim).permute(1, 2, 0, 3)  # [Hkv, g, w, D]
    scores = torch.einsum("hgwd,hnd->hgwn", q, keys.float()) / math.sqrt(dim)
    visible = torch.arange(n, device=keys.device)[None, :] <= torch.arange(first, first + w, device=keys.device)[:, None]
    return scores.masked_fill(~visible, float("-inf")).softmax(-1)
