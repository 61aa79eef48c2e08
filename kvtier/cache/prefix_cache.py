"""Automatic prefix caching: find which leading blocks of a prompt already hold computed K/V.

``PrefixCache`` is the interface the KV cache manager talks to; ``BlockHashPrefixCache`` is
vLLM's scheme (each full block keyed by a chained hash of its parent's key and its tokens).
A radix tree that also keeps SSM states (Marconi) replaces it behind the same interface.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

from kvtier.cache.block_pool import BlockPool, KVBlock


class PrefixCache(ABC):
    """Maps token prefixes to the pool's blocks that hold their K/V."""

    def __init__(self, pool: BlockPool, block_size: int) -> None:
        self.pool = pool
        self.block_size = block_size
        self.queries = 0  # tokens looked up
        self.hits = 0  # tokens found

    @abstractmethod
    def match(self, token_ids: Sequence[int], max_blocks: int) -> list[KVBlock]:
        """The longest run of cached blocks for the leading full blocks of ``token_ids``."""

    @abstractmethod
    def insert(self, seq_id: int, token_ids: Sequence[int], blocks: Sequence[KVBlock], num_computed: int) -> None:
        """Index every full block of sequence ``seq_id`` whose tokens are all computed."""

    @abstractmethod
    def drop_sequence(self, seq_id: int) -> None:
        """Forget per-sequence bookkeeping (the blocks stay cached)."""

    def record(self, queried: int, hit: int) -> None:
        self.queries += queried
        self.hits += hit


def chain_hash(parent: int | None, tokens: Sequence[int]) -> int:
    return hash((parent, tuple(tokens)))


class BlockHashPrefixCache(PrefixCache):
    def __init__(self, pool: BlockPool, block_size: int) -> None:
        super().__init__(pool, block_size)
        self._by_hash: dict[int, KVBlock] = {}
        self._cursor: dict[int, tuple[int, int | None]] = {}  # seq -> (blocks hashed, last hash)
        pool.on_evict = self._forget

    def _forget(self, block: KVBlock) -> None:
        if self._by_hash.get(block.block_hash) is block:
            del self._by_hash[block.block_hash]

    def _hashes(self, token_ids: Sequence[int], num_blocks: int) -> list[int]:
        out: list[int] = []
        parent = None
        bs = self.block_size
        for i in range(num_blocks):
            parent = chain_hash(parent, token_ids[i * bs : (i + 1) * bs])
            out.append(parent)
        return out

    def match(self, token_ids: Sequence[int], max_blocks: int) -> list[KVBlock]:
        found: list[KVBlock] = []
        for h in self._hashes(token_ids, min(max_blocks, len(token_ids) // self.block_size)):
            block = self._by_hash.get(h)
            if block is None:
                break
            found.append(block)
        return found

    def insert(self, seq_id: int, token_ids: Sequence[int], blocks: Sequence[KVBlock], num_computed: int) -> None:
        full = min(num_computed // self.block_size, len(blocks))
        done, parent = self._cursor.get(seq_id, (0, None))
        bs = self.block_size
        for i in range(done, full):
            parent = chain_hash(parent, token_ids[i * bs : (i + 1) * bs])
            block = blocks[i]
            if block.block_hash is None and parent not in self._by_hash:
                self._by_hash[parent] = block
                block.block_hash = parent
        if full > done:
            self._cursor[seq_id] = (full, parent)

    def drop_sequence(self, seq_id: int) -> None:
        self._cursor.pop(seq_id, None)
