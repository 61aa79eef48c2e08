"""A state checkpoint: everything a sequence's cache held after its first ``num_tokens`` tokens, pinned.

For attention layers that is the K/V blocks of those tokens; for a hybrid's Mamba2 layers, the state slot as
it was after the last of them (a recurrent state cannot be recomputed from a prefix of itself, so it is kept
whole). A new sequence whose prompt starts with ``token_ids`` resumes from the checkpoint: its tables start
with the pinned blocks and it computes only the rest. Marconi's prefix cache keeps its entries as checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvtier.cache.block_pool import KVBlock


@dataclass(eq=False)
class StateCheckpoint:
    token_ids: tuple[int, ...]  # the tokens whose cache it holds
    blocks: tuple[list[KVBlock | None], ...] = field(repr=False)  # per layer group, the pinned table
    released: bool = False

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)
