"""Property tests of the KV cache manager: random allocate / append / fork / free / prefix-hit / evict
sequences never leak or double-free a block, keep reference counts equal to the number of table
references, and never let one sequence's writes change another sequence's tokens.

The test keeps its own model of what every physical slot holds, applying the manager's
copy-on-write orders exactly as the worker would, and checks each sequence reads back its tokens.
"""

from __future__ import annotations

from collections import Counter

from hypothesis import settings
from hypothesis import strategies as st
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
        for kind, src, dst in self.kv.take_ops().moves:
            assert kind == "copy"  # this machine never swaps
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
    @rule(prompts=st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=14), min_size=1, max_size=3))
    def add_sequences(self, prompts: list[list[int]]) -> None:
        """Admit one to three new sequences at once (a recomputed n > 1 request), each reusing its cached prefix."""
        sids = list(range(self.next_id, self.next_id + len(prompts)))
        self.next_id += len(prompts)
        prefixes = [self.kv.computed_prefix(p) for p in prompts]
        before = self.kv.num_free_blocks
        if not self.kv.admit([(sid, len(p), prefix) for sid, p, prefix in zip(sids, prompts, prefixes)]):
            assert self.kv.num_free_blocks == before and not any(sid in self.kv.tables for sid in sids), "a failed admission must change nothing"
            return
        self._apply_ops()
        for sid, prompt, prefix in zip(sids, prompts, prefixes):
            # a prefix hit must hold exactly the prompt's leading tokens, even after the group's other allocations
            done = len(prefix) * BLOCK
            table = self.kv.block_ids(sid)
            for i in range(done):
                assert self.slots[(table[i // BLOCK], i % BLOCK)] == prompt[i]
            self.seqs[sid] = list(prompt[:done])
        for sid, prompt, prefix in zip(sids, prompts, prefixes):
            table = self.kv.block_ids(sid)
            for i in range(len(prefix) * BLOCK, len(prompt)):
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
        free_ids = [b.block_id for b in self.kv.pool._free] + list(self.kv.prefix_cache._lru)
        assert len(free_ids) == len(set(free_ids)), "a block is free twice"
        in_use = {b.block_id for t in self.kv.tables.values() for b in t}
        assert not in_use & set(free_ids), "a referenced block is on a free list"
        assert len(in_use) + len(free_ids) == NUM_BLOCKS, "a block leaked"

    @invariant()
    def cached_blocks_hold_their_tokens(self) -> None:
        """Whatever the prefix cache indexes must still hold, slot for slot, the tokens it was indexed for."""
        pc = self.kv.prefix_cache
        for key, block in pc._by_key.items():
            entry = pc._entries[block.block_id]
            assert entry.key == key
            assert entry.tokens == tuple(self.slots.get((block.block_id, off)) for off in range(BLOCK))

    @invariant()
    def only_unreferenced_cached_blocks_are_evictable(self) -> None:
        pc = self.kv.prefix_cache
        for block_id, block in pc._lru.items():
            assert block.ref_count == 0 and block_id in pc._entries
        cached_unused = {b.block_id for b in self.kv.pool.blocks if b.ref_count == 0 and b.block_id in pc._entries}
        assert cached_unused == set(pc._lru), "every unreferenced cached block is the prefix cache's to evict"


class ConstantKeyMachine(KVCacheMachine):
    """The same rules with every block keyed alike: each key collides, and every hit must still be the right prefix."""

    def __init__(self) -> None:
        super().__init__()
        self.kv.prefix_cache.key_of = lambda parent, tokens: 0


TestKVCacheManager = KVCacheMachine.TestCase
TestKVCacheManager.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
TestKVCacheManagerUnderCollisions = ConstantKeyMachine.TestCase
TestKVCacheManagerUnderCollisions.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_admitting_a_group_never_evicts_a_prefix_another_member_reuses():
    """Hand-worked: four cached prompts A, B, C, D (LRU in that order); X reuses A's block and needs every plain free
    block plus one more, Y reuses B's. Taking X's blocks one member at a time would evict B's block (the oldest not
    in use) and then hand it to Y as its prefix while X writes into it."""
    kv = KVCacheManager(8, BLOCK, enable_prefix_caching=True)
    prompts = {name: [tok] * BLOCK + [9] for name, tok in (("A", 1), ("B", 2), ("C", 3), ("D", 4))}
    for sid, prompt in enumerate(prompts.values()):
        assert kv.admit([(sid, len(prompt), ())])
        kv.cache_computed(sid, prompt, len(prompt))
    for sid in range(4):
        kv.free(sid)
    plain_free = kv.pool.num_free - kv.pool.num_cached_unused
    x = prompts["A"][:BLOCK] + [5] * (BLOCK * plain_free + 1)
    y = prompts["B"][:BLOCK] + [6]
    px, py = kv.computed_prefix(x), kv.computed_prefix(y)
    assert len(px) == len(py) == 1
    assert kv.admit([(10, len(x), px), (11, len(y), py)])
    assert not set(kv.block_ids(10)) & set(kv.block_ids(11)), "X and Y share no tokens, so no block"
    assert kv.tables[11][0] is py[0] and kv.computed_prefix(prompts["B"]) == [py[0]], "Y's prefix block still holds B's tokens"


def test_block_moves_are_done_in_the_order_decided():
    """A copy-on-write whose destination is then swapped out: the host must get the copied K/V, not the old contents."""
    import torch

    from kvtier.cache.kv_storage import KVStorage, MemoryPlan
    from kvtier.cache.ops import CacheOps

    plan = MemoryPlan.from_budget(4 * BLOCK * 8, 2 * BLOCK * 8, BLOCK, 8)  # 4 device, 2 host blocks of 1 layer x 1 head x dim 1, fp32
    storage = KVStorage(plan, 1, 1, 1, torch.float32, torch.device("cpu"))
    for b in range(4):
        storage.device_kv[:, :, :, b * BLOCK:(b + 1) * BLOCK] = float(b)
    ops = CacheOps()
    ops.add("copy", 1, 2)  # block 2 takes block 1's K/V ...
    ops.add("swap_out", 2, 0)  # ... and then goes to host block 0
    ops.add("copy", 3, 2)  # block 2, given back, is reused at once
    assert [kind for kind, _ in ops.runs()] == ["copy", "swap_out", "copy"]
    storage.apply(ops)
    assert storage.host_kv[:, :, :, 0:BLOCK].eq(1.0).all()
    assert storage.device_kv[:, :, :, 2 * BLOCK:3 * BLOCK].eq(3.0).all()
    chained = CacheOps()
    for src, dst in [(0, 1), (1, 2), (3, 0)]:
        chained.add("copy", src, dst)
    assert [pairs for _, pairs in chained.runs()] == [[(0, 1)], [(1, 2), (3, 0)]], "a batch never reads a block it writes"
