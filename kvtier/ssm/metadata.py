"""Per-step layout of a Mamba layer's work: which state-pool slot each sequence's tokens read and update.

Tokens are laid out as the attention backend laid them out (decodes first, one token each, then prefill
chunks), so one flattened batch serves both kinds of layer. Built once per step and shared by every Mamba
layer of the group.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvtier.attention.metadata import ScheduledTokens


@dataclass(frozen=True)
class StateSpan:
    """One sequence's chunk of new tokens: rows [start, start + length) of the batch, continuing the state in ``slot``."""

    start: int
    length: int
    slot: int


@dataclass(frozen=True)
class MambaMetadata:
    decode_slots: torch.Tensor  # [num_decodes] long: the slot of each leading one-token row's sequence
    prefills: tuple[StateSpan, ...]
    fresh_slots: torch.Tensor  # [n] long: slots of sequences starting at position 0, whose state starts at zero

    @property
    def num_decodes(self) -> int:
        return self.decode_slots.numel()


def plan_states(ordered: Sequence[ScheduledTokens], group: int, device: torch.device) -> MambaMetadata:
    """The metadata for a step whose rows are ``ordered``: the leading run of one-token rows steps the recurrence
    in one batch, every other row scans its chunk. A slot is the one block of the sequence's table in ``group``."""
    decodes: list[int] = []
    spans: list[StateSpan] = []
    offset = 0
    for s in ordered:
        slot = s.block_ids[group][0]
        if s.num_tokens == 1 and not spans:
            decodes.append(slot)
        else:
            spans.append(StateSpan(offset, s.num_tokens, slot))
        offset += s.num_tokens
    fresh = [s.block_ids[group][0] for s in ordered if s.start == 0]
    return MambaMetadata(torch.tensor(decodes, dtype=torch.long, device=device), tuple(spans),
                         torch.tensor(fresh, dtype=torch.long, device=device))
