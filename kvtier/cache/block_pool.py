"""The pool of physical KV blocks: reference counts and a free list.

Only this module hands out or takes back block ids. A block whose reference count drops to zero is
offered to the pool's ``keeper`` (the prefix cache) first: a block the keeper retains stays out of the
free list, in the keeper's own eviction order, until an allocation finds no plain free block and asks
the keeper to give one up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(eq=False)
class KVBlock:
    block_id: int
    ref_count: int = 0


class BlockKeeper(Protocol):
    """Who keeps unreferenced blocks for reuse, and in which order it gives them up."""

    @property
    def num_evictable(self) -> int: ...

    def retain(self, block: KVBlock) -> bool:
        """``block`` is no longer referenced: keep it (True) or let the pool free it (False)."""

    def reclaim(self, block: KVBlock) -> None:
        """A retained block is referenced again: it is no longer evictable."""

    def evict(self) -> KVBlock | None:
        """Give up the retained block to evict next, forgetting what it held; None when none is retained."""


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self._free: list[KVBlock] = list(reversed(self.blocks))  # pop() yields low ids first
        self.keeper: BlockKeeper | None = None

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        """Blocks an allocation could take now: plain free plus evictable cached."""
        return len(self._free) + self.num_cached_unused

    @property
    def num_cached_unused(self) -> int:
        return self.keeper.num_evictable if self.keeper is not None else 0

    def allocate(self) -> KVBlock:
        block = self._free.pop() if self._free else self.keeper.evict() if self.keeper is not None else None
        if block is None:
            raise RuntimeError("KV block pool exhausted: callers must check num_free first")
        block.ref_count = 1
        return block

    def acquire(self, block: KVBlock) -> None:
        """Take one more reference; a retained block stops being evictable."""
        if block.ref_count == 0 and self.keeper is not None:
            self.keeper.reclaim(block)
        block.ref_count += 1

    def release(self, block: KVBlock) -> None:
        if block.ref_count <= 0:
            raise RuntimeError(f"double free of KV block {block.block_id}")
        block.ref_count -= 1
        if block.ref_count == 0 and not (self.keeper is not None and self.keeper.retain(block)):
            self._free.append(block)
