"""SnapKV (Li et al., 2024): the prompt's last ``window_size`` queries vote for the keys worth keeping.

One-shot after prefill, with kvpress's ``SnapKVPress`` definitions: each query head's attention from the window over
the keys before it (softmax over the whole prompt, causal inside the window), averaged over the window's queries,
smoothed along the keys by a pooling of ``kernel_size``, then averaged over the query heads that share a KV head
(grouped-query attention: one choice per KV head). The window itself is always kept; the rest of the budget goes to
the best-scored keys. kvpress pools by average; the paper max-pools, ``pooling: "max"``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvtier.errors import InvalidArgumentError
from kvtier.kv_methods.base import KVMethod, KVMethodConfig, PromptCache, prompt_attention


@dataclass(frozen=True)
class SnapKVConfig(KVMethodConfig):
    window_size: int = 64  # kvpress's default
    kernel_size: int = 5
    pooling: str = "avg"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("window_size", "kernel_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidArgumentError(f"kv_method_config.{name}", f"must be an integer >= 1, got {value!r}")
        if self.kernel_size % 2 == 0:
            raise InvalidArgumentError("kv_method_config.kernel_size", f"must be odd (the pooling is centred), got {self.kernel_size}")
        if self.pooling not in ("avg", "max"):
            raise InvalidArgumentError("kv_method_config.pooling", f"must be 'avg' (kvpress) or 'max' (the paper), got {self.pooling!r}")


class SnapKV(KVMethod):
    name = "snapkv"
    config_class = SnapKVConfig
    config: SnapKVConfig

    @property
    def window(self) -> int:
        return self.config.window_size

    def after_prefill(self, prompt: PromptCache) -> torch.Tensor | None:
        n = prompt.num_tokens
        kept = self.config.kept(n)
        if kept >= n:
            return None
        window = min(self.config.window_size, n - 1)  # at least one key outside the window to score
        return torch.stack([self._keep(prompt.window_queries(layer)[-window:], prompt.keys(layer), kept) for layer in range(prompt.num_layers)])

    def _keep(self, queries: torch.Tensor, keys: torch.Tensor, kept: int) -> torch.Tensor:
        """queries [w, H, D], keys [Hkv, n, D] -> the kept positions [Hkv, kept], ascending."""
        window, heads, _ = queries.shape
        kv_heads, n, _ = keys.shape
        probs = prompt_attention(queries, keys, n - window)[..., : n - window]  # causal inside the window
        votes = probs.mean(2).flatten(0, 1)  # [Hkv * g, n - w]: the window's mean attention per query head
        pool = F.avg_pool1d if self.config.pooling == "avg" else F.max_pool1d
        votes = pool(votes[:, None], self.config.kernel_size, stride=1, padding=self.config.kernel_size // 2)[:, 0]
        votes = votes.view(kv_heads, heads // kv_heads, -1).mean(1)  # one choice per KV head
        votes = F.pad(votes, (0, window), value=votes.max().item() + 1)  # the window outranks every key
        return votes.topk(kept, dim=-1).indices.sort(dim=-1).values
