"""Property tests of the KV cache manager: random allocate / append / fork / free / prefix-hit / evict
sequences never leak or double-free a block, keep reference counts equal to the number of table
references, and never let one sequence's writes change another sequence's tokens.

The test keeps its own model of what every physical slot holds, applying the manager's
copy-on-write orders exactly as the worker would, and checks each sequence reads back its tokens.
"""

from __future__ import annotations

from collections import Counter

from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvtier.cache.kv_cache_manager import KVCacheManager

BLOCK = 4
NUM_BLOCKS = 24


class KVCacheMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.kv = KVCacheManager(NUM_BLOCKS, BLOCK, enable_prefix_caching=True)
        self.slots: dict[tuple[int, int], int] = {}  # (block_id, offset) -> token held
        self.seqs: dict[int, list[int]] = {}  # seq_id -> tokens whose K/V are written
        self.next_id = 0

    # ---- helpers mirroring the worker ----------------------------------------------------------
    def _apply_ops(self) -> None:
        for src, dst in self.kv.take_ops().copies:
            for off in range(BLOCK):
                if (src, off) in self.slots:
                    self.slots[(dst, off)] = self.slots[(src, off)]
                else:
                    self.slots.pop((dst, off), None)

    def _write(self, sid: int, new_tokens: list[int]) -> bool:
        tokens = self.seqs[sid]
        start = len(tokens)
        if not self.kv.allocate(sid, start, start + len(new_tokens)):
            return False
        self._apply_ops()
        table = self.kv.block_ids(sid)
        for i, tok in enumerate(new_tokens, start):
            self.slots[(table[i // BLOCK], i % BLOCK)] = tok
        tokens.extend(new_tokens)
        self.kv.cache_computed(sid, tokens, len(tokens))
        return True

    # ---- rules ----------------------------------------------------------------------------------
    @rule(prompt=st.lists(st.integers(0, 3), min_size=1, max_size=14))
    def add_sequence(self, prompt: list[int]) -> None:
        sid = self.next_id
        self.next_id += 1
        prefix = self.kv.computed_prefix(prompt)
        done = len(prefix) * BLOCK
        if not self.kv.allocate(sid, done, len(prompt), prefix):
            return
        self._apply_ops()
        # a prefix hit must hold exactly the prompt's leading tokens
        table = self.kv.block_ids(sid)
        for i in range(done):
            assert self.slots[(table[i // BLOCK], i % BLOCK)] == prompt[i]
        self.seqs[sid] = list(prompt[:done])
        for i in range(done, len(prompt)):
            self.slots[(table[i // BLOCK], i % BLOCK)] = prompt[i]
        self.seqs[sid] = list(prompt)
        self.kv.cache_computed(sid, prompt, len(prompt))

    @precondition(lambda self: self.seqs)
    @rule(data=st.data(), new=st.lists(st.integers(0, 3), min_size=1, max_size=6))
    def append(self, data, new: list[int]) -> None:
        sid = data.draw(st.sampled_from(sorted(self.seqs)))
        before = self.kv.num_free_blocks
        if not self._write(sid, new):
            assert self.kv.num_free_blocks == before, "a failed allocation must change nothing"

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def fork(self, data) -> None:
        parent = data.draw(st.sampled_from(sorted(self.seqs)))
        child = self.next_id
        self.next_id += 1
        self.kv.fork(parent, child)
        self.seqs[child] = list(self.seqs[parent])

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def free(self, data) -> None:
        sid = data.draw(st.sampled_from(sorted(self.seqs)))
        self.kv.free(sid)
        del self.seqs[sid]

    @rule()
    def evict_one(self) -> None:
        """Take a block (evicting an LRU cached one if needed) and give it straight back."""
        if self.kv.pool.num_free:
            block = self.kv.pool.allocate()
            self.kv.pool.release(block)

    # ---- invariants -----------------------------------------------------------------------------
    @invariant()
    def every_sequence_reads_its_own_tokens(self) -> None:
        for sid, tokens in self.seqs.items():
            table = self.kv.block_ids(sid)
            assert len(table) * BLOCK >= len(tokens)
            got = [self.slots.get((table[i // BLOCK], i % BLOCK)) for i in range(len(tokens))]
            assert got == tokens, f"seq {sid} reads {got}, wrote {tokens}"

    @invariant()
    def reference_counts_match_tables(self) -> None:
        refs = Counter(b.block_id for t in self.kv.tables.values() for b in t)
        for block in self.kv.pool.blocks:
            assert block.ref_count == refs.get(block.block_id, 0)

    @invariant()
    def no_leak_no_double_free(self) -> None:
        pool = self.kv.pool
        free_ids = [b.block_id for b in pool._free] + list(pool._evictable)
        assert len(free_ids) == len(set(free_ids)), "a block is free twice"
        in_use = {b.block_id for t in self.kv.tables.values() for b in t}
        assert not in_use & set(free_ids), "a referenced block is on a free list"
        assert len(in_use) + len(free_ids) == NUM_BLOCKS, "a block leaked"

    @invariant()
    def cached_blocks_hold_their_hashed_tokens(self) -> None:
        """Whatever the prefix cache indexes must still hold the tokens it was indexed for."""
        pc = self.kv.prefix_cache
        for h, block in pc._by_hash.items():
            assert block.block_hash == h


TestKVCacheManager = KVCacheMachine.TestCase
TestKVCacheManager.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
