"""H2O (Zhang et al., NeurIPS 2023): keep the heavy hitters, the tokens that received the most attention, and the most
recent tokens.

Each token's score is the attention it has received, summed over every query so far: the prompt's queries once the
prompt is in the cache (then the prompt is cut to the budget), then each decoded token's as it attends. Of a
``budget``-token cache, ``recent_fraction`` goes to the latest tokens and the rest to the best-scored others (the
paper splits the two evenly). ``normalize`` divides a score by the number of queries that could see the token, the
mean attention kvpress's ``ObservedAttentionPress`` ranks by (with ``recent_fraction: 0`` it is that press).

Choices are per layer and KV head; under grouped-query attention a KV head's score is the sum over the query heads
that share it. The paper evicts one token per decoded token; in paged memory a compaction copies the kept tokens into
fresh blocks, so here the cache grows one block past the budget and is then cut back to it: the same rule, applied a
block of tokens at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvtier.cache.layer_cache import LayerCache
from kvtier.errors import InvalidArgumentError
from kvtier.kv_methods.base import ALL_QUERIES, DecodeCache, KVMethod, KVMethodConfig, PromptCache, prompt_attention

QUERY_CHUNK = 256  # prompt queries scored at once: bounds the [heads, chunk, tokens] probabilities held


@dataclass(frozen=True)
class H2OConfig(KVMethodConfig):
    recent_fraction: float = 0.5
    normalize: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.normalize, bool):
            raise InvalidArgumentError("kv_method_config.normalize", f"must be true or false, got {self.normalize!r}")
        r = self.recent_fraction
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r <= 1:
            raise InvalidArgumentError("kv_method_config.recent_fraction", f"must be a number in [0, 1], got {r!r}")


class H2O(KVMethod):
    name = "h2o"
    config_class = H2OConfig
    config: H2OConfig
    slot_stats = True
    decode_hooks = True
    observes_decode = True

    @property
    def window(self) -> int:
        return ALL_QUERIES

    def after_prefill(self, prompt: PromptCache) -> torch.Tensor | None:
        n = prompt.num_tokens
        scores = []
        for layer in range(prompt.num_layers):
            scores.append(received_attention(prompt.window_queries(layer), prompt.keys(layer)))
            prompt.write_stats(layer, scores[-1])
        kept = self.config.kept(n)
        if kept >= n:
            return None
        positions = torch.arange(n, device=scores[0].device).expand(prompt.num_kv_heads, -1)
        return torch.stack([self._keep(self._ranked(s, positions, n), kept) for s in scores])

    def observe_decode(self, cache: LayerCache, head: int, slots: torch.Tensor, probs: torch.Tensor) -> None:
        cache.slot_stats[head].index_add_(0, slots.flatten(), probs.sum(1).flatten())

    def after_decode(self, cache: DecodeCache) -> torch.Tensor | None:
        kept = self.config.kept(cache.num_tokens)
        if cache.num_slots < kept + cache.block_size:
            return None
        n = cache.num_tokens
        return torch.stack([self._keep(self._ranked(cache.stats(layer), cache.positions(layer), n), kept) for layer in range(cache.num_layers)])

    def _ranked(self, scores: torch.Tensor, positions: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """What the choice ranks: the accumulated attention, or its mean over the queries that saw each token (every
        query from the token's own position on)."""
        return scores / (num_tokens - positions) if self.config.normalize else scores

    def _keep(self, scores: torch.Tensor, kept: int) -> torch.Tensor:
        """scores [kv_heads, n] -> the kept slots [kv_heads, kept], ascending: the last ``recent`` and the best of the rest."""
        heads, n = scores.shape
        recent = int(kept * self.config.recent_fraction)
        heavy = scores[:, : n - recent].topk(kept - recent, dim=-1).indices
        return torch.cat([heavy, torch.arange(n - recent, n, device=scores.device).expand(heads, -1)], dim=-1).sort(dim=-1).values


def received_attention(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """queries [n, H, D], keys [Hkv, n, D] of the same n tokens -> [Hkv, n]: the causal attention each key received,
    summed over every query and over the query heads sharing its KV head (fp32)."""
    total = torch.zeros(keys.shape[0], keys.shape[1], device=keys.device)
    for lo in range(0, queries.shape[0], QUERY_CHUNK):
        total += prompt_attention(queries[lo : lo + QUERY_CHUNK], keys, lo).sum((1, 2))
    return total
