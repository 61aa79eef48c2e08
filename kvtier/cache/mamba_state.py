"""One group's state slots for Mamba2 layers: one slot per sequence, shared by forks until one of them writes.

A slot is a block of the group's pool that holds the conv and SSM states of every layer in the group,
so the block machinery carries over: admission takes a slot, ``free`` returns it, swap moves it to a
host slot and back. Unlike a K/V block, a slot is rewritten by every step of its sequence, so a slot
shared after a fork (``n > 1``, beam search) is copied before the next step of any sequence sharing it
(vLLM's and SGLang's hybrids copy at fork; copying on write lets the scheduler preempt instead of
failing when no slot is free). A recurrent state cannot be cut back to a prefix, so the group offers no
block-hash prefix hits; a state checkpoint (:mod:`kvtier.cache.checkpoint`) pins a slot as it was after a
chosen token, and a sequence resumed from it copies the slot before its first step, like a fork.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvtier.cache.block_pool import KVBlock
from kvtier.cache.full_attention import FullAttentionManager
from kvtier.cache.specs import MambaSpec


class MambaStateManager(FullAttentionManager):
    spec: MambaSpec

    def __init__(self, spec: MambaSpec, num_blocks: int, num_host_blocks: int = 0, enable_prefix_caching: bool = False,
                 prefix_caching_hash_algo: str = "sha256") -> None:
        super().__init__(spec, num_blocks, num_host_blocks, enable_prefix_caching=False)

    def _written_block(self, table: Sequence[KVBlock | None], num_computed: int) -> int | None:
        """Every step rewrites the slot, whatever the position."""
        return 0 if table else None

    def swap_in_reserve(self, num_seqs: int) -> int:
        """A slot needs no new one to grow; a slot shared among the sequences may need one copy each."""
        return num_seqs
