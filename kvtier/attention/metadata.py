"""Per-step attention metadata: where new K/V go and which cache slots each query reads.

Built once per engine step by the model runner and shared by every layer, so the
per-layer work is only gathers and SDPA calls.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PrefillSpan:
    """One sequence's chunk of new tokens (query length > 1) in the flattened batch."""

    start: int  # offset of the chunk in the flattened token batch
    query_len: int
    context_len: int  # cached + new tokens this chunk attends over
    slots: torch.Tensor | None  # [context_len] cache slots to gather; None when context == chunk
    positions: torch.Tensor  # [query_len] absolute positions of the chunk's tokens


@dataclass
class AttentionMetadata:
    """Tokens are laid out decodes first (one token each), then prefill chunks."""

    slot_mapping: torch.Tensor  # [T] flat cache slot of every new token
    num_decode_tokens: int
    decode_slots: torch.Tensor | None  # [Bd, L] flat slots to gather, padded
    decode_context_lens: torch.Tensor | None  # [Bd]
    decode_positions: torch.Tensor | None  # [Bd] position of each decode token
    prefills: list[PrefillSpan]
    _masks: dict[int | None, torch.Tensor] | None = None

    def decode_mask(self, window: int | None) -> torch.Tensor:
        """[Bd, 1, 1, L] keys each decode query may see; cached per window size for the step."""
        if self._masks is None:
            self._masks = {}
        mask = self._masks.get(window)
        if mask is None:
            key_pos = torch.arange(self.decode_slots.shape[1])
            mask = key_pos[None, :] < self.decode_context_lens[:, None]
            if window is not None:
                mask &= key_pos[None, :] > (self.decode_positions[:, None] - window)
            mask = mask[:, None, None, :]
            self._masks[window] = mask
        return mask


def prefill_mask(span: PrefillSpan, window: int | None) -> torch.Tensor:
    """[query_len, context_len] causal (and sliding-window) visibility for one chunk."""
    key_pos = torch.arange(span.context_len)
    q_pos = span.positions[:, None]
    mask = key_pos[None, :] <= q_pos
    if window is not None:
        mask &= key_pos[None, :] > q_pos - window
    return mask
