"""One group's block tables for full-attention layers: allocation, prefix hits, copy-on-write, swap.

The manager speaks in sequences (ids and token lists) for its group of layers; its pools speak in
blocks. Physical copies it decides on (copy-on-write, swap) are queued as moves for the worker. It is
also the base of every per-kind manager (``SlidingWindowManager`` overrides what a window changes);
the ``KVCacheCoordinator`` drives one per layer group. A table entry of None is a block the sequence
no longer holds (it fell out of a window).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvtier.cache.block_pool import BlockPool, KVBlock
from kvtier.cache.ops import CacheOps, Compaction, MoveKind, token_slots
from kvtier.cache.prefix_cache import BlockHashPrefixCache, PrefixCache
from kvtier.cache.specs import KVCacheSpec

Table = list[KVBlock | None]
Wanted = Sequence[tuple[int, int, int, Sequence[KVBlock | None]]]  # (seq_id, tokens computed, tokens to hold, its prefix hit's blocks)


class FullAttentionManager:
    def __init__(self, spec: KVCacheSpec, num_blocks: int, num_host_blocks: int = 0, enable_prefix_caching: bool = True,
                 prefix_caching_hash_algo: str = "sha256") -> None:
        self.spec = spec
        self.block_size = spec.block_size
        self.pool = BlockPool(num_blocks)
        self.host_pool = BlockPool(num_host_blocks)
        self.prefix_cache: PrefixCache | None = (BlockHashPrefixCache(self.pool, self.block_size, prefix_caching_hash_algo)
                                                 if enable_prefix_caching else None)
        self.tables: dict[int, Table] = {}
        self.host_tables: dict[int, Table] = {}
        self.ops = CacheOps()
        self.watermark = max(1, num_blocks // 100)  # headroom so admissions do not cause immediate preemption

    # ---- queries -------------------------------------------------------------------------
    def block_ids(self, seq_id: int) -> list[int]:
        """The sequence's table as block ids; -1 where it holds no block (never read by attention)."""
        return [-1 if b is None else b.block_id for b in self.tables[seq_id]]

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    # ---- prefix hits ---------------------------------------------------------------------
    def cached_prefix(self, token_ids: Sequence[int], max_blocks: int) -> list[KVBlock | None]:
        """What the prefix cache knows of the leading ``max_blocks`` blocks (None: known, block evicted)."""
        return self.prefix_cache.match(token_ids, max_blocks) if self.prefix_cache is not None else []

    def hit_length(self, known: Sequence[KVBlock | None], max_blocks: int) -> int:
        """The most leading blocks, at most ``max_blocks``, a sequence could skip computing: every one must be cached."""
        n = min(max_blocks, len(known))
        return next((i for i in range(n) if known[i] is None), n)

    def hit_blocks(self, known: Sequence[KVBlock | None], num_blocks: int) -> list[KVBlock | None]:
        """The table a hit of ``num_blocks`` blocks starts with."""
        return list(known[:num_blocks])

    # ---- allocation ----------------------------------------------------------------------
    def remove_skipped(self, seq_id: int, num_computed: int) -> None:
        """Release blocks no future query of the sequence reads; full attention reads them all."""

    def can_allocate(self, seq_id: int, num_total_tokens: int, reserve: int = 0) -> bool:
        need = self.spec.blocks_for(num_total_tokens) - len(self.tables.get(seq_id, ()))
        return need + self._cow_need(seq_id) <= self.pool.num_free - reserve

    def allocate(self, seq_id: int, num_computed: int, num_total_tokens: int) -> None:
        """Grow ``seq_id``'s table to hold ``num_total_tokens``; copy-on-write the block it will write into.

        The caller (the coordinator, for every group at once) has checked ``can_allocate``.
        """
        table = self.tables.setdefault(seq_id, [])
        self._copy_on_write(table, num_computed)
        while len(table) < self.spec.blocks_for(num_total_tokens):
            table.append(self.pool.allocate())

    def can_admit(self, wanted: Wanted, reserve: int = 0) -> bool:
        """Whether ``admit`` would succeed with ``reserve`` blocks left over."""
        reused = {id(b): b for _, _, _, prefix in wanted for b in prefix if b is not None}
        # cached blocks about to be reused leave the evictable set, so they do not count as free
        reused_free = sum(1 for b in reused.values() if b.ref_count == 0)
        need = sum(max(0, self.spec.blocks_for(total) - len(prefix)) for _, _, total, prefix in wanted)
        copies = sum(1 for _, computed, _, prefix in wanted if self._written_block(prefix, computed) is not None)
        return need + copies <= self.pool.num_free - reused_free - reserve

    def admit(self, wanted: Wanted) -> None:
        """Give new sequences ``(seq_id, tokens computed, tokens to hold, prefix hit blocks)`` their tables; the caller has
        checked ``can_admit``. A hit that ends inside a block (a state checkpoint's) shares that block, so it is copied
        before the sequence writes its next token there.

        Every reused prefix block is pinned before any new block is taken: a new block may come from
        the LRU of cached blocks, and must not be one that another sequence of the group reuses.
        """
        if any(seq_id in self.tables for seq_id, _, _, _ in wanted):
            raise RuntimeError("admit is for sequences without a block table")
        for seq_id, _, _, prefix in wanted:
            for block in prefix:
                if block is not None:
                    self.pool.acquire(block)
            self.tables[seq_id] = list(prefix)
        for seq_id, computed, total, _ in wanted:
            table = self.tables[seq_id]
            self._copy_on_write(table, computed)
            while len(table) < self.spec.blocks_for(total):
                table.append(self.pool.allocate())

    def _cow_need(self, seq_id: int) -> int:
        table = self.tables.get(seq_id)
        return 1 if table and table[-1] is not None and table[-1].ref_count > 1 else 0

    def _written_block(self, table: Sequence[KVBlock | None], num_computed: int) -> int | None:
        """Index of the table's block the next step writes into and that already holds tokens: the partial block at
        ``num_computed``, if any (writes go to positions >= num_computed)."""
        idx = num_computed // self.block_size
        return idx if num_computed % self.block_size and idx < len(table) else None

    def _copy_on_write(self, table: Table, num_computed: int) -> None:
        """A shared block the next step writes into gets a private copy."""
        idx = self._written_block(table, num_computed)
        if idx is not None and table[idx].ref_count > 1:
            src = table[idx]
            dst = self.pool.allocate()
            self.ops.add("copy", src.block_id, dst.block_id)
            self.pool.release(src)
            table[idx] = dst

    def fork(self, parent_id: int, child_id: int) -> None:
        """The child shares every block of the parent (copy-on-write later)."""
        self.tables[child_id] = self.hold(self.tables[parent_id])

    def hold(self, table: Table) -> Table:
        """A copy of ``table`` whose blocks are held once more until ``unhold``. A sequence that shares them copies a
        block before writing into it, so what a held table holds stays as it is."""
        for block in table:
            if block is not None:
                self.pool.acquire(block)
        return list(table)

    def unhold(self, table: Table) -> None:
        for block in reversed(table):
            if block is not None:
                self.pool.release(block)

    # ---- compaction (KV methods) -----------------------------------------------------------
    def can_compact(self, seq_id: int, num_kept: int) -> bool:
        """Whether the kept tokens' blocks can be had once the sequence gives up its table (what only it holds comes back)."""
        own = sum(1 for b in self.tables[seq_id] if b is not None and b.ref_count == 1)
        return self.spec.blocks_for(num_kept) <= self.pool.num_free + own

    def compact(self, seq_id: int, keep: torch.Tensor) -> None:
        """Keep only the tokens at positions ``keep`` [layers of the group, kv_heads, n] (ascending, the same count
        everywhere): the old table is given back, then the kept tokens move, in order, into newly allocated blocks.
        A block another sequence or the prefix cache holds is never written (it is not given back to the pool); one
        only this sequence held may be reallocated as a destination, which is safe because a compaction reads all
        its sources before it writes. The caller has checked ``can_compact``."""
        bs = self.block_size
        old = self.tables[seq_id]
        ids = torch.tensor([-1 if b is None else b.block_id for b in old], dtype=torch.long)
        src = token_slots(ids, keep, bs)
        self.unhold(old)
        table = [self.pool.allocate() for _ in range(self.spec.blocks_for(keep.shape[-1]))]
        new_ids = torch.tensor([b.block_id for b in table], dtype=torch.long)
        self.ops.compact(Compaction(src, token_slots(new_ids, torch.arange(keep.shape[-1]), bs)))
        self.tables[seq_id] = table
        if self.prefix_cache is not None:
            self.prefix_cache.drop_sequence(seq_id)

    def cache_computed(self, seq_id: int, token_ids: Sequence[int], num_computed: int) -> None:
        if self.prefix_cache is not None and seq_id in self.tables:
            self.prefix_cache.insert(seq_id, token_ids, self.tables[seq_id], num_computed)

    def free(self, seq_id: int) -> None:
        """Release the sequence's blocks, last block first so a prefix outlives its tail in the LRU."""
        self.unhold(self.tables.pop(seq_id, []))
        for block in self.host_tables.pop(seq_id, []):
            if block is not None:
                self.host_pool.release(block)
        if self.prefix_cache is not None:
            self.prefix_cache.drop_sequence(seq_id)

    # ---- swapping ------------------------------------------------------------------------
    @staticmethod
    def _distinct(tables: Sequence[Table]) -> int:
        return len({id(b) for t in tables for b in t if b is not None})

    def can_swap_out(self, seq_ids: Sequence[int]) -> bool:
        return self._distinct([self.tables[s] for s in seq_ids]) <= self.host_pool.num_free

    def swap_out(self, seq_ids: Sequence[int]) -> None:
        """Move the sequences' blocks to host memory, keeping sharing among them."""
        _move_tables(seq_ids, self.tables, self.pool, self.host_tables, self.host_pool, self.ops, "swap_out")
        if self.prefix_cache is not None:
            for sid in seq_ids:
                self.prefix_cache.drop_sequence(sid)

    def can_swap_in(self, seq_ids: Sequence[int], reserve: int = 0) -> bool:
        return self._distinct([self.host_tables[s] for s in seq_ids]) <= self.pool.num_free - reserve

    def swap_in_reserve(self, num_seqs: int) -> int:
        """Free blocks a swap-in must leave: one new and one copied block per sequence, and the watermark."""
        return 2 * num_seqs + self.watermark

    def swap_in(self, seq_ids: Sequence[int]) -> None:
        _move_tables(seq_ids, self.host_tables, self.host_pool, self.tables, self.pool, self.ops, "swap_in")

    def take_ops(self) -> CacheOps:
        ops, self.ops = self.ops, CacheOps()
        return ops


def _move_tables(
    seq_ids: Sequence[int],
    src_tables: dict[int, Table],
    src_pool: BlockPool,
    dst_tables: dict[int, Table],
    dst_pool: BlockPool,
    ops: CacheOps,
    kind: MoveKind,
) -> None:
    """Re-home the sequences' tables in ``dst_pool``; a block shared among them gets one copy, still shared."""
    mapping: dict[int, KVBlock] = {}
    for sid in seq_ids:
        table: Table = []
        for block in src_tables.pop(sid):
            if block is None:
                table.append(None)
                continue
            moved = mapping.get(id(block))
            if moved is None:
                moved = mapping[id(block)] = dst_pool.allocate()
                ops.add(kind, block.block_id, moved.block_id)
            else:
                dst_pool.acquire(moved)
            table.append(moved)
            src_pool.release(block)
        dst_tables[sid] = table
