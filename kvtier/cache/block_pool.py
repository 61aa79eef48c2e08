"""The pool of physical KV blocks: reference counts, a free list, and an LRU of cached-but-unused blocks.

Only this module hands out or takes back block ids. A block whose reference count drops to
zero but that a prefix cache still knows (it has a hash) is not freed: it joins the LRU and
is evicted, oldest first, only when no plain free block is left.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(eq=False)
class KVBlock:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None  # set while a prefix cache indexes this block


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self._free: list[KVBlock] = list(reversed(self.blocks))  # pop() yields low ids first
        self._evictable: OrderedDict[int, KVBlock] = OrderedDict()
        self.on_evict: Callable[[KVBlock], None] = lambda block: None

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        """Blocks an allocation could take now: plain free plus evictable cached."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached_unused(self) -> int:
        return len(self._evictable)

    def allocate(self) -> KVBlock:
        if self._free:
            block = self._free.pop()
        elif self._evictable:
            _, block = self._evictable.popitem(last=False)
            self.on_evict(block)
            block.block_hash = None
        else:
            raise RuntimeError("KV block pool exhausted: callers must check num_free first")
        block.ref_count = 1
        return block

    def acquire(self, block: KVBlock) -> None:
        """Take one more reference; a cached block leaves the LRU."""
        if block.ref_count == 0:
            self._evictable.pop(block.block_id, None)
        block.ref_count += 1

    def release(self, block: KVBlock) -> None:
        if block.ref_count <= 0:
            raise RuntimeError(f"double free of KV block {block.block_id}")
        block.ref_count -= 1
        if block.ref_count == 0:
            if block.block_hash is not None:
                self._evictable[block.block_id] = block
            else:
                self._free.append(block)

    def uncache(self, block: KVBlock) -> None:
        """Forget a block's hash; an unused one becomes plainly free."""
        if block.block_hash is None:
            return
        block.block_hash = None
        if block.ref_count == 0 and self._evictable.pop(block.block_id, None) is not None:
            self._free.append(block)
