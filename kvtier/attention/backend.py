"""The attention backend interface: how a layer reads and writes the paged KV cache.

One backend is chosen by name for the whole engine (``--attention-backend``). The model runner asks it
once per step to lay out the step's tokens and build its metadata for each layer group (``plan``), and
every attention layer calls its ``forward`` with its group's metadata. A backend owns its metadata
because what is worth precomputing depends on how it reads the cache. KV methods extend this interface rather than the
model code: a layer's cache comes with what the method keeps beside K and V (``LayerCache``), and a decode step calls
the method's hooks (``AttentionMetadata.kv_method``) to choose the blocks each KV head reads (Quest) and to see the
attention each cache slot received (H2O). A decode step's attention probabilities also go to whoever asks
(``AttentionMetadata.decode_probs``, surfaced by ``ModelRunner.execute(..., decode_probs=True)``). K and V in
different tiers (they already come as separate tensors) arrive with the method that uses them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from kvtier.attention.metadata import AttentionMetadata, ScheduledTokens
from kvtier.cache.layer_cache import LayerCache


class AttentionBackend(ABC):
    name: ClassVar[str]

    @abstractmethod
    def plan(self, seqs: list[ScheduledTokens], block_size: int, windows: dict[int, int | None],
             device: torch.device) -> tuple[list[ScheduledTokens], list[AttentionMetadata]]:
        """The step's sequences in the order their tokens are laid out in the batch, and for each attention layer group
        (``windows`` maps its index among the step's block tables to its sliding window, or None) the metadata for that
        layout over the group's block tables, in ``windows``' order."""

    def prepare(self, model: torch.nn.Module, max_batch: int) -> None:
        """Adapt the model this backend serves, once after loading (the reference backend leaves it as loaded);
        ``max_batch``: the most decode rows a step holds."""
        return None

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerCache, meta: AttentionMetadata,
                scale: float) -> torch.Tensor:
        """Write this step's K/V [T, Hkv, D] into the layer's cache, then attend: q [T, H, D] -> [T, H, D]."""
