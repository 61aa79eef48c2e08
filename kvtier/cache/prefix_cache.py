"""Automatic prefix caching: find which leading blocks of a prompt already hold computed K/V.

``PrefixCache`` is the interface the KV cache manager talks to. It also keeps the blocks nobody
references any more and decides which of them is evicted first, so each policy brings its own order.
``BlockHashPrefixCache`` is vLLM's scheme: each full block is keyed by a chained hash of its parent's
key and its tokens, evicted least recently used first. A key only finds a candidate: the cache keeps
every cached block's tokens and the identity of its parent, and a hit must match both all the way from
the first block, so no hash collision (by chance, or by a crafted prompt) can hand a request another
prefix's K/V. A radix tree
that also keeps SSM states (Marconi) replaces it behind the same interface.
"""

from __future__ import annotations

import hashlib
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
        pool.keeper = self

    @abstractmethod
    def match(self, token_ids: Sequence[int], max_blocks: int) -> list[KVBlock | None]:
        """The longest run of known prefix blocks for the leading full blocks of ``token_ids``: each one's cached block,
        or None where the prefix is known but its block was evicted (which a sliding-window group can do without)."""

    @abstractmethod
    def insert(self, seq_id: int, token_ids: Sequence[int], blocks: Sequence[KVBlock | None], num_computed: int) -> None:
        """Index every full block of sequence ``seq_id`` whose tokens are all computed (None: a block it no longer holds)."""

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


KeyFunction = Callable[[Hashable | None, tuple[int, ...]], Hashable]


def sha256_key(parent: Hashable | None, tokens: tuple[int, ...]) -> bytes:
    """vLLM's default: SHA-256 over the parent's digest and the tokens as 64-bit integers."""
    return hashlib.sha256((parent or b"") + array("q", tokens).tobytes()).digest()


def builtin_key(parent: Hashable | None, tokens: tuple[int, ...]) -> int:
    """Python's ``hash``: faster, and easy to collide on purpose; the token check keeps hits correct, a collision only costs a miss."""
    return hash((parent, tokens))


HASH_ALGOS: dict[str, KeyFunction] = {"sha256": sha256_key, "builtin": builtin_key}


@dataclass(eq=False)
class _Node:
    """One cached prefix block: its key, its tokens, the node before it, and the block holding its K/V.

    A node whose block was evicted stays (as a ghost, ``block`` None) while a later node still names it as
    parent, so that later node can still be verified from the root: a sliding-window group reuses a
    prefix whose early blocks are gone.
    """

    key: Hashable
    tokens: tuple[int, ...]
    parent: _Node | None
    block: KVBlock | None
    children: int = 0


_BROKEN = _Node(None, (), None, None)  # cursor of a sequence whose chain met a key held by another prefix: it caches nothing further


class BlockHashPrefixCache(PrefixCache):
    def __init__(self, pool: BlockPool, block_size: int, hash_algo: str = "sha256") -> None:
        super().__init__(pool, block_size)
        self.key_of = HASH_ALGOS[hash_algo]
        self._by_key: dict[Hashable, _Node] = {}
        self._node_of: dict[int, _Node] = {}  # block_id -> the prefix that block holds
        self._lru: OrderedDict[int, KVBlock] = OrderedDict()  # unreferenced cached blocks, oldest first
        self._cursor: dict[int, tuple[int, Hashable | None, _Node | None]] = {}  # seq -> (blocks walked, last key, last node)

    def _chunk(self, token_ids: Sequence[int], i: int) -> tuple[int, ...]:
        return tuple(token_ids[i * self.block_size : (i + 1) * self.block_size])

    def _lookup(self, key: Hashable, tokens: tuple[int, ...], parent: _Node | None) -> _Node | None:
        """The node cached under ``key`` if it holds exactly ``tokens`` right after exactly ``parent``."""
        node = self._by_key.get(key)
        return node if node is not None and node.tokens == tokens and node.parent is parent else None

    def match(self, token_ids: Sequence[int], max_blocks: int) -> list[KVBlock | None]:
        found: list[KVBlock | None] = []
        key: Hashable | None = None
        node: _Node | None = None
        for i in range(min(max_blocks, len(token_ids) // self.block_size)):
            chunk = self._chunk(token_ids, i)
            key = self.key_of(key, chunk)
            node = self._lookup(key, chunk, node)
            if node is None:
                break
            found.append(node.block)
        return found

    def insert(self, seq_id: int, token_ids: Sequence[int], blocks: Sequence[KVBlock | None], num_computed: int) -> None:
        full = min(num_computed // self.block_size, len(blocks))
        done, key, parent = self._cursor.get(seq_id, (0, None, None))
        for i in range(done, full):
            if parent is _BROKEN:
                break
            chunk = self._chunk(token_ids, i)
            key = self.key_of(key, chunk)
            block = blocks[i]
            node = self._lookup(key, chunk, parent)
            if node is not None:  # this prefix is known (in this block, a twin computed elsewhere, or a ghost)
                if node.block is None and block is not None and block.block_id not in self._node_of:
                    node.block = block
                    self._node_of[block.block_id] = node
            elif block is None or key in self._by_key or block.block_id in self._node_of:
                node = _BROKEN  # the key holds another prefix, or the block is gone: nothing after it could be found again
            else:
                node = self._by_key[key] = self._node_of[block.block_id] = _Node(key, chunk, parent, block)
                if parent is not None:
                    parent.children += 1
            parent = node
        if full > done:
            self._cursor[seq_id] = (full, key, parent)

    def drop_sequence(self, seq_id: int) -> None:
        self._cursor.pop(seq_id, None)

    @property
    def num_evictable(self) -> int:
        return len(self._lru)

    def retain(self, block: KVBlock) -> bool:
        if block.block_id not in self._node_of:
            return False
        self._lru[block.block_id] = block
        return True

    def reclaim(self, block: KVBlock) -> None:
        self._lru.pop(block.block_id, None)

    def evict(self) -> KVBlock | None:
        if not self._lru:
            return None
        _, block = self._lru.popitem(last=False)
        node: _Node | None = self._node_of.pop(block.block_id)
        node.block = None
        while node is not None and node.block is None and node.children == 0:  # drop ghosts nothing names any more
            if self._by_key.get(node.key) is node:
                del self._by_key[node.key]
            if node.parent is not None:
                node.parent.children -= 1
            node = node.parent
        return block
