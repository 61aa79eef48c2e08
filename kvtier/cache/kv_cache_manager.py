"""Per-sequence block tables over the block pool: allocation, prefix hits, copy-on-write, swap.

The manager speaks in sequences (ids and token lists); the pool speaks in blocks. Physical
copies it decides on (copy-on-write, swap) are queued as (src, dst) pairs for the worker.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvtier.cache.block_pool import BlockPool, KVBlock
from kvtier.cache.ops import CacheOps, MoveKind
from kvtier.cache.prefix_cache import BlockHashPrefixCache, PrefixCache


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True, num_host_blocks: int = 0,
                 prefix_caching_hash_algo: str = "sha256") -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.host_pool = BlockPool(num_host_blocks)
        self.prefix_cache: PrefixCache | None = (BlockHashPrefixCache(self.pool, block_size, prefix_caching_hash_algo)
                                                 if enable_prefix_caching else None)
        self.tables: dict[int, list[KVBlock]] = {}
        self.host_tables: dict[int, list[KVBlock]] = {}
        self.ops = CacheOps()

    # ---- queries -------------------------------------------------------------------------
    def block_ids(self, seq_id: int) -> list[int]:
        return [b.block_id for b in self.tables[seq_id]]

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    def usage(self) -> float:
        """Fraction of device blocks referenced by a live sequence."""
        return 1.0 - self.pool.num_free / max(1, self.pool.num_blocks)

    # ---- allocation ----------------------------------------------------------------------
    def computed_prefix(self, token_ids: Sequence[int]) -> list[KVBlock]:
        """Cached blocks for the prompt's leading full blocks, leaving at least one token to compute."""
        if self.prefix_cache is None:
            return []
        max_blocks = (len(token_ids) - 1) // self.block_size
        return self.prefix_cache.match(token_ids, max_blocks)

    def record_prefix_lookup(self, queried_tokens: int, hit_tokens: int) -> None:
        if self.prefix_cache is not None:
            self.prefix_cache.record(queried_tokens, hit_tokens)

    def can_allocate(self, seq_id: int, num_total_tokens: int, reserve: int = 0) -> bool:
        need = blocks_needed(num_total_tokens, self.block_size) - len(self.tables.get(seq_id, ()))
        return need + self._cow_need(seq_id) <= self.pool.num_free - reserve

    def allocate(self, seq_id: int, num_computed: int, num_total_tokens: int) -> bool:
        """Grow ``seq_id``'s table to hold ``num_total_tokens``; copy-on-write the block it will write into.

        Returns False (and changes nothing) when the pool cannot hold it.
        """
        if not self.can_allocate(seq_id, num_total_tokens):
            return False
        table = self.tables.setdefault(seq_id, [])
        self._copy_on_write(table, num_computed)
        while len(table) < blocks_needed(num_total_tokens, self.block_size):
            table.append(self.pool.allocate())
        return True

    def admit(self, wanted: Sequence[tuple[int, int, Sequence[KVBlock]]], reserve: int = 0) -> bool:
        """Give new sequences ``(seq_id, tokens to hold, cached prefix blocks)`` their tables, all or none.

        Every reused prefix block is pinned before any new block is taken: a new block may come from
        the LRU of cached blocks, and must not be one that another sequence of the group reuses.
        """
        if any(seq_id in self.tables for seq_id, _, _ in wanted):
            raise RuntimeError("admit is for sequences without a block table")
        reused = {id(b): b for _, _, prefix in wanted for b in prefix}
        # cached blocks about to be reused leave the evictable set, so they do not count as free
        reused_free = sum(1 for b in reused.values() if b.ref_count == 0)
        need = sum(max(0, blocks_needed(total, self.block_size) - len(prefix)) for _, total, prefix in wanted)
        if need > self.pool.num_free - reused_free - reserve:
            return False
        for seq_id, _, prefix in wanted:
            for block in prefix:
                self.pool.acquire(block)
            self.tables[seq_id] = list(prefix)
        for seq_id, total, _ in wanted:
            table = self.tables[seq_id]
            while len(table) < blocks_needed(total, self.block_size):
                table.append(self.pool.allocate())
        return True

    def _cow_need(self, seq_id: int) -> int:
        table = self.tables.get(seq_id)
        return 1 if table and table[-1].ref_count > 1 else 0

    def _copy_on_write(self, table: list[KVBlock], num_computed: int) -> None:
        """Writes go to positions >= num_computed; a shared partial block there gets a private copy."""
        idx = num_computed // self.block_size
        if num_computed % self.block_size and idx < len(table) and table[idx].ref_count > 1:
            src = table[idx]
            dst = self.pool.allocate()
            self.ops.add("copy", src.block_id, dst.block_id)
            self.pool.release(src)
            table[idx] = dst

    def fork(self, parent_id: int, child_id: int) -> None:
        """The child shares every block of the parent (copy-on-write later)."""
        table = self.tables[parent_id]
        for block in table:
            self.pool.acquire(block)
        self.tables[child_id] = list(table)

    def cache_computed(self, seq_id: int, token_ids: Sequence[int], num_computed: int) -> None:
        if self.prefix_cache is not None and seq_id in self.tables:
            self.prefix_cache.insert(seq_id, token_ids, self.tables[seq_id], num_computed)

    def free(self, seq_id: int) -> None:
        """Release the sequence's blocks, last block first so a prefix outlives its tail in the LRU."""
        for block in reversed(self.tables.pop(seq_id, [])):
            self.pool.release(block)
        for block in self.host_tables.pop(seq_id, []):
            self.host_pool.release(block)
        if self.prefix_cache is not None:
            self.prefix_cache.drop_sequence(seq_id)

    # ---- swapping ------------------------------------------------------------------------
    def _distinct(self, tables: Sequence[list[KVBlock]]) -> list[KVBlock]:
        return list({id(b): b for t in tables for b in t}.values())

    def can_swap_out(self, seq_ids: Sequence[int]) -> bool:
        return len(self._distinct([self.tables[s] for s in seq_ids])) <= self.host_pool.num_free

    def swap_out(self, seq_ids: Sequence[int]) -> None:
        """Move the sequences' blocks to host memory, keeping sharing among them."""
        _move_tables(seq_ids, self.tables, self.pool, self.host_tables, self.host_pool, self.ops, "swap_out")
        if self.prefix_cache is not None:
            for sid in seq_ids:
                self.prefix_cache.drop_sequence(sid)

    def can_swap_in(self, seq_ids: Sequence[int], reserve: int = 0) -> bool:
        return len(self._distinct([self.host_tables[s] for s in seq_ids])) <= self.pool.num_free - reserve

    def swap_in(self, seq_ids: Sequence[int]) -> None:
        _move_tables(seq_ids, self.host_tables, self.host_pool, self.tables, self.pool, self.ops, "swap_in")

    def take_ops(self) -> CacheOps:
        ops, self.ops = self.ops, CacheOps()
        return ops


def _move_tables(
    seq_ids: Sequence[int],
    src_tables: dict[int, list[KVBlock]],
    src_pool: BlockPool,
    dst_tables: dict[int, list[KVBlock]],
    dst_pool: BlockPool,
    ops: CacheOps,
    kind: MoveKind,
) -> None:
    """Re-home the sequences' tables in ``dst_pool``; a block shared among them gets one copy, still shared."""
    mapping: dict[int, KVBlock] = {}
    for sid in seq_ids:
        table = []
        for block in src_tables.pop(sid):
            moved = mapping.get(id(block))
            if moved is None:
                moved = mapping[id(block)] = dst_pool.allocate()
                ops.add(kind, block.block_id, moved.block_id)
            else:
                dst_pool.acquire(moved)
            table.append(moved)
            src_pool.release(block)
        dst_tables[sid] = table
