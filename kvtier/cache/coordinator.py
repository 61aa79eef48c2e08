"""The KV cache of a request as a whole: one manager per layer group, asked together.

The scheduler speaks only to the coordinator (can a request be admitted, how many of its tokens are
cached, allocate, fork, free, swap); each question goes to every group's manager and is answered for
all of them at once, all or nothing. Which manager serves a group is decided by its spec, so a new
kind of cache state is a new spec and manager, and the scheduler does not learn its name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kvtier.cache.block_pool import KVBlock
from kvtier.cache.checkpoint import StateCheckpoint
from kvtier.cache.full_attention import FullAttentionManager
from kvtier.cache.mamba_state import MambaStateManager
from kvtier.cache.memory_plan import MemoryPlan
from kvtier.cache.ops import CacheOps
from kvtier.cache.sliding_window import SlidingWindowManager
from kvtier.cache.specs import FullAttentionSpec, HostValueSpec, KVCacheSpec, MambaSpec, SlidingWindowSpec

if TYPE_CHECKING:
    from kvtier.cache.state_prefix_cache import StatePrefixCache

MANAGERS: dict[type[KVCacheSpec], type[FullAttentionManager]] = {
    FullAttentionSpec: FullAttentionManager,
    SlidingWindowSpec: SlidingWindowManager,
    HostValueSpec: FullAttentionManager,
    MambaSpec: MambaStateManager,
}


@dataclass(frozen=True)
class PrefixHit:
    """The leading tokens of a prompt whose cache every group holds (whole blocks of the prefix cache, or a state
    checkpoint's tokens), with each group's blocks for them."""

    num_tokens: int
    blocks: tuple[list[KVBlock | None], ...]  # per group; None where the group needs no block (out of its window)


class KVCacheCoordinator:
    def __init__(self, plan: MemoryPlan, max_chunk: int, enable_prefix_caching: bool = True, prefix_caching_hash_algo: str = "sha256") -> None:
        self.block_size = plan.block_size
        self.max_chunk = max_chunk
        self.prefix_caching = enable_prefix_caching
        self.managers = [MANAGERS[type(g.group.spec)](g.group.spec, g.num_blocks, g.num_host_blocks, enable_prefix_caching, prefix_caching_hash_algo)
                         for g in plan.groups]
        self.group_layers = [g.group.layers for g in plan.groups]  # each group's model layers, in its storage order
        self.prefix_queries = 0  # prompt tokens looked up
        self.state_prefix: StatePrefixCache | None = None  # the radix-tree prefix cache of checkpoints, set by the engine
        self.prefix_hits = 0  # prompt tokens found

    # ---- queries -------------------------------------------------------------------------
    def has(self, seq_id: int) -> bool:
        """Whether the sequence holds device blocks."""
        return seq_id in self.managers[0].tables

    def block_ids(self, seq_id: int) -> tuple[list[int], ...]:
        return tuple(m.block_ids(seq_id) for m in self.managers)

    @property
    def min_blocks(self) -> int:
        """Blocks of the smallest group's pool: how many sequences could each hold one block at most."""
        return min(m.pool.num_blocks for m in self.managers)

    def fits(self, num_tokens: int) -> bool:
        """Whether one sequence of ``num_tokens`` tokens could run with every pool to itself."""
        return all(m.spec.max_blocks(num_tokens, self.max_chunk) <= m.pool.num_blocks for m in self.managers)

    # ---- prefix hits ---------------------------------------------------------------------
    def computed_prefix(self, token_ids: Sequence[int]) -> PrefixHit:
        """The longest prefix of whole blocks every group can reuse (with a state prefix cache: the deepest checkpoint),
        leaving at least one token to compute."""
        if self.state_prefix is not None:
            return self.state_prefix.hit(token_ids[:-1]) or PrefixHit(0, tuple([] for _ in self.managers))
        n = max(0, len(token_ids) - 1) // self.block_size
        known = [m.cached_prefix(token_ids, n) for m in self.managers]
        while True:  # each group's longest hit within n; a shorter one bounds the others, until all agree
            shortest = min(m.hit_length(k, n) for m, k in zip(self.managers, known))
            if shortest == n:
                break
            n = shortest
        return PrefixHit(n * self.block_size, tuple(m.hit_blocks(k, n) for m, k in zip(self.managers, known)))

    def reclaim(self) -> bool:
        """Free cached state the prefix cache holds (its policy's next victim), so a pool that ran short can serve running
        requests; False when there is nothing to give back. Block-hash hits need none: their pools evict on demand."""
        return self.state_prefix is not None and self.state_prefix.reclaim()

    def record_prefix_lookup(self, queried_tokens: int, hit_tokens: int) -> None:
        self.prefix_queries += queried_tokens
        self.prefix_hits += hit_tokens

    # ---- allocation ----------------------------------------------------------------------
    def allocate(self, seq_id: int, num_computed: int, num_total_tokens: int) -> bool:
        """Make room for tokens ``num_computed .. num_total_tokens`` in every group, or change nothing and return False
        (blocks no future query reads may still be released)."""
        for m in self.managers:
            m.remove_skipped(seq_id, num_computed)
        if not all(m.can_allocate(seq_id, num_total_tokens) for m in self.managers):
            return False
        for m in self.managers:
            m.allocate(seq_id, num_computed, num_total_tokens)
        return True

    def admit(self, wanted: Sequence[tuple[int, int, PrefixHit | None]], keep_watermark: bool = False) -> bool:
        """Give new sequences ``(seq_id, tokens to hold, prefix hit)`` their tables in every group, all or none."""
        per_group = [[(sid, hit.num_tokens if hit else 0, total, hit.blocks[g] if hit else ()) for sid, total, hit in wanted]
                     for g in range(len(self.managers))]
        if not all(m.can_admit(w, m.watermark if keep_watermark else 0) for m, w in zip(self.managers, per_group)):
            return False
        for m, w in zip(self.managers, per_group):
            m.admit(w)
        return True

    def fork(self, parent_id: int, child_id: int) -> None:
        for m in self.managers:
            m.fork(parent_id, child_id)

    # ---- compaction (KV methods) -------------------------------------------------------------
    def compact(self, seq_id: int, keep: torch.Tensor) -> bool:
        """Keep only positions ``keep`` [model layers, kv_heads, n] of the sequence's cache, in every group at once; False
        (nothing changed) when some group's pool lacks the blocks for the kept tokens now, even once the prefix cache
        has given back what it can."""
        while not all(m.can_compact(seq_id, keep.shape[-1]) for m in self.managers):
            if not self.reclaim():
                return False
        for m, layers in zip(self.managers, self.group_layers):
            m.compact(seq_id, keep[list(layers)])
        return True

    # ---- state checkpoints ---------------------------------------------------------------
    def checkpoint(self, seq_id: int, token_ids: Sequence[int]) -> StateCheckpoint:
        """Pin what the sequence's cache holds for its first ``token_ids``: the blocks of those tokens, and a recurrent
        state as it is now (so a model with state groups must have computed exactly ``token_ids``)."""
        n = len(token_ids)
        return StateCheckpoint(tuple(token_ids), tuple(m.hold(m.tables[seq_id][: m.spec.blocks_for(n)]) for m in self.managers))

    def share(self, ckpt: StateCheckpoint) -> StateCheckpoint:
        """A second hold on the same blocks, released on its own."""
        return StateCheckpoint(ckpt.token_ids, tuple(m.hold(t) for m, t in zip(self.managers, ckpt.blocks)))

    def release(self, ckpt: StateCheckpoint) -> None:
        """Give the checkpoint's blocks back (once; a second release does nothing)."""
        if not ckpt.released:
            for m, table in zip(self.managers, ckpt.blocks):
                m.unhold(table)
            ckpt.released = True

    @staticmethod
    def resume_hit(ckpt: StateCheckpoint) -> PrefixHit:
        """The hit a sequence resumed from ``ckpt`` is admitted with."""
        return PrefixHit(ckpt.num_tokens, tuple(list(t) for t in ckpt.blocks))

    def cache_computed(self, seq_id: int, token_ids: Sequence[int], num_computed: int) -> None:
        for m in self.managers:
            m.cache_computed(seq_id, token_ids, num_computed)

    def free(self, seq_id: int) -> None:
        for m in self.managers:
            m.free(seq_id)

    # ---- swapping ------------------------------------------------------------------------
    def can_swap_out(self, seq_ids: Sequence[int]) -> bool:
        return all(m.can_swap_out(seq_ids) for m in self.managers)

    def swap_out(self, seq_ids: Sequence[int]) -> None:
        for m in self.managers:
            m.swap_out(seq_ids)

    def can_swap_in(self, seq_ids: Sequence[int]) -> bool:
        """Room for the swapped blocks plus what their next step needs (``swap_in_reserve``), in every group."""
        return all(m.can_swap_in(seq_ids, m.swap_in_reserve(len(seq_ids))) for m in self.managers)

    def swap_in(self, seq_ids: Sequence[int]) -> None:
        for m in self.managers:
            m.swap_in(seq_ids)

    def take_ops(self) -> tuple[CacheOps, ...]:
        """Each group's block moves since the last step."""
        return tuple(m.take_ops() for m in self.managers)
