"""Automatic prefix caching: find which leading blocks of a prompt already hold computed K/V.

``PrefixCache`` is the interface the KV cache manager talks to. It also keeps the blocks nobody
references any more and decides which of them is evicted first, so each policy brings its own order.
``BlockHashPrefixCache`` is vLLM's scheme: each full block is keyed by a chained hash of its parent's
key and its tokens, evicted least recently used first. A key only finds a candidate: the cache keeps
every cached block's tokens and the identity of its parent, and a hit must match both, so no hash
collision (by chance, or by a crafted prompt) can hand a request another prefix's K/V. A radix tree
that also keeps SSM states (Marconi) replaces it behind the same interface.
"""

from __future__ import annotations

import hashlib
import itertools
from abc import ABC, abstractmethod
from array import array
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

from kvtier.cache.block_pool import BlockPool, KVBlock


class PrefixCache(ABC):
    """Maps token prefixes to the pool's blocks that hold their K/V; keeps the unreferenced ones, in its own eviction order."""

    def __init__(self, pool: BlockPool, block_size: int) -> None:
        self.pool = pool
        self.block_size = block_size
        self.queries = 0  # tokens looked up
        self.hits = 0  # tokens found
        pool.keeper = self

    @abstractmethod
    def match(self, token_ids: Sequence[int], max_blocks: int) -> list[KVBlock]:
        """The longest run of cached blocks for the leading full blocks of ``token_ids``."""

    @abstractmethod
    def insert(self, seq_id: int, token_ids: Sequence[int], blocks: Sequence[KVBlock], num_computed: int) -> None:
        """Index every full block of sequence ``seq_id`` whose tokens are all computed."""

    @abstractmethod
    def drop_sequence(self, seq_id: int) -> None:
        """Forget per-sequence bookkeeping (the blocks stay cached)."""

    # ---- the pool's keeper: unreferenced cached blocks and their eviction order -------------------
    @property
    @abstractmethod
    def num_evictable(self) -> int:
        """Cached blocks no sequence references."""

    @abstractmethod
    def retain(self, block: KVBlock) -> bool:
        """``block`` is no longer referenced: keep it if it is cached."""

    @abstractmethod
    def reclaim(self, block: KVBlock) -> None:
        """A kept block is referenced again (a prefix hit)."""

    @abstractmethod
    def evict(self) -> KVBlock | None:
        """Forget the kept block to evict next and hand it to the pool."""

    def record(self, queried: int, hit: int) -> None:
        self.queries += queried
        self.hits += hit


KeyFunction = Callable[[Hashable | None, tuple[int, ...]], Hashable]


def sha256_key(parent: Hashable | None, tokens: tuple[int, ...]) -> bytes:
    """vLLM's default: SHA-256 over the parent's digest and the tokens as 64-bit integers."""
    return hashlib.sha256((parent or b"") + array("q", tokens).tobytes()).digest()


def builtin_key(parent: Hashable | None, tokens: tuple[int, ...]) -> int:
    """Python's ``hash``: faster, and easy to collide on purpose; the token check keeps hits correct, a collision only costs a miss."""
    return hash((parent, tokens))


HASH_ALGOS: dict[str, KeyFunction] = {"sha256": sha256_key, "builtin": builtin_key}


@dataclass(frozen=True)
class _Entry:
    """What a cached block holds: its tokens, its key, and which cached block precedes it (by serial)."""

    key: Hashable
    tokens: tuple[int, ...]
    parent: int | None  # serial of the previous block's entry; None for a sequence's first block
    serial: int  # unique per caching, so a parent evicted and its block reused is never taken for the old one


_BROKEN = -1  # a sequence whose chain met a key held by another prefix: it caches no further blocks


class BlockHashPrefixCache(PrefixCache):
    def __init__(self, pool: BlockPool, block_size: int, hash_algo: str = "sha256") -> None:
        super().__init__(pool, block_size)
        self.key_of = HASH_ALGOS[hash_algo]
        self._by_key: dict[Hashable, KVBlock] = {}
        self._entries: dict[int, _Entry] = {}  # block_id -> what that block holds
        self._lru: OrderedDict[int, KVBlock] = OrderedDict()  # unreferenced cached blocks, oldest first
        self._cursor: dict[int, tuple[int, Hashable | None, int | None]] = {}  # seq -> (blocks walked, last key, last serial)
        self._serials = itertools.count()

    def _chunk(self, token_ids: Sequence[int], i: int) -> tuple[int, ...]:
        return tuple(token_ids[i * self.block_size : (i + 1) * self.block_size])

    def _lookup(self, key: Hashable, tokens: tuple[int, ...], parent: int | None) -> KVBlock | None:
        """The block cached under ``key`` if it holds exactly ``tokens`` after exactly ``parent``."""
        block = self._by_key.get(key)
        if block is None:
            return None
        entry = self._entries[block.block_id]
        return block if entry.tokens == tokens and entry.parent == parent else None

    def match(self, token_ids: Sequence[int], max_blocks: int) -> list[KVBlock]:
        found: list[KVBlock] = []
        key: Hashable | None = None
        serial: int | None = None
        for i in range(min(max_blocks, len(token_ids) // self.block_size)):
            chunk = self._chunk(token_ids, i)
            key = self.key_of(key, chunk)
            block = self._lookup(key, chunk, serial)
            if block is None:
                break
            found.append(block)
            serial = self._entries[block.block_id].serial
        return found

    def insert(self, seq_id: int, token_ids: Sequence[int], blocks: Sequence[KVBlock], num_computed: int) -> None:
        full = min(num_computed // self.block_size, len(blocks))
        done, key, serial = self._cursor.get(seq_id, (0, None, None))
        for i in range(done, full):
            if serial == _BROKEN:
                break
            chunk = self._chunk(token_ids, i)
            key = self.key_of(key, chunk)
            cached = self._lookup(key, chunk, serial)
            if cached is not None:  # this prefix is cached already (in this block, or in a twin computed elsewhere)
                serial = self._entries[cached.block_id].serial
            elif key in self._by_key or blocks[i].block_id in self._entries:
                serial = _BROKEN  # the key holds another prefix: nothing after it could be found again
            else:
                entry = _Entry(key, chunk, serial, next(self._serials))
                self._by_key[key] = blocks[i]
                self._entries[blocks[i].block_id] = entry
                serial = entry.serial
        if full > done:
            self._cursor[seq_id] = (full, key, serial)

    def drop_sequence(self, seq_id: int) -> None:
        self._cursor.pop(seq_id, None)

    @property
    def num_evictable(self) -> int:
        return len(self._lru)

    def retain(self, block: KVBlock) -> bool:
        if block.block_id not in self._entries:
            return False
        self._lru[block.block_id] = block
        return True

    def reclaim(self, block: KVBlock) -> None:
        self._lru.pop(block.block_id, None)

    def evict(self) -> KVBlock | None:
        if not self._lru:
            return None
        _, block = self._lru.popitem(last=False)
        entry = self._entries.pop(block.block_id)
        if self._by_key.get(entry.key) is block:
            del self._by_key[entry.key]
        return block
