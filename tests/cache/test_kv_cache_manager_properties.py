"""Property tests of the KV cache managers behind the coordinator: random allocate / append / fork / free /
prefix-hit / evict / checkpoint / resume / compact (a KV method's eviction) sequences never leak or double-free a block, keep reference counts equal
to the number of table and checkpoint references, and never let one sequence's writes change another sequence's
(or a checkpoint's) tokens. The same rules run over a sliding-window group, which must also give back every block
its window has left.

The test keeps its own model of what every physical slot holds, applying the manager's
copy-on-write and compaction orders exactly as the worker would, and checks each sequence reads back its tokens.
"""

from __future__ import annotations

from collections import Counter

import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvtier.cache.checkpoint import StateCheckpoint
from kvtier.cache.coordinator import KVCacheCoordinator
from kvtier.cache.full_attention import FullAttentionManager
from kvtier.cache.memory_plan import MemoryPlan
from kvtier.cache.ops import Compaction
from kvtier.cache.specs import FullAttentionSpec, KVCacheGroup, SlidingWindowSpec

BLOCK = 4
NUM_BLOCKS = 24
WINDOW = 6  # of the sliding-window machine: between one and two blocks, so windows straddle block edges


def coordinator(num_blocks: int, window: int | None = None, hash_algo: str = "sha256") -> KVCacheCoordinator:
    """One layer group of ``num_blocks`` blocks (1 layer, 1 KV head of dimension 1, fp32: 32 bytes a block)."""
    spec = (FullAttentionSpec(BLOCK, 1, 1, torch.float32) if window is None else SlidingWindowSpec(BLOCK, 1, 1, torch.float32, window=window))
    plan = MemoryPlan.split([KVCacheGroup(spec, (0,))], num_blocks * 32, 0, 4096, 64)
    assert plan.groups[0].num_blocks == num_blocks
    return KVCacheCoordinator(plan, 64, enable_prefix_caching=True, prefix_caching_hash_algo=hash_algo)


class KVCacheMachine(RuleBasedStateMachine):
    window: int | None = None

    def __init__(self) -> None:
        super().__init__()
        self.coord = coordinator(NUM_BLOCKS, self.window)
        self.kv = self.coord.managers[0]
        self.slots: dict[tuple[int, int], int] = {}  # (block_id, offset) -> token held
        self.seqs: dict[int, list[int]] = {}  # seq_id -> tokens whose K/V are written
        self.checkpoints: list[StateCheckpoint] = []
        self.compacted: set[int] = set()  # sequences whose cache a compaction cut: never offered as a prefix, as the engine does
        self.next_id = 0

    # ---- helpers mirroring the worker ----------------------------------------------------------
    def _apply_ops(self) -> None:
        for move in self.kv.take_ops().moves:
            if isinstance(move, Compaction):  # one layer, one KV head: read every source, then write
                held = [self.slots.get((int(s) // BLOCK, int(s) % BLOCK)) for s in move.src[0, 0]]
                for d, tok in zip(move.dst.tolist(), held):
                    self.slots[(d // BLOCK, d % BLOCK)] = tok
                continue
            kind, src, dst = move
            assert kind == "copy"  # this machine never swaps
            for off in range(BLOCK):
                if (src, off) in self.slots:
                    self.slots[(dst, off)] = self.slots[(src, off)]
                else:
                    self.slots.pop((dst, off), None)

    def _first_read(self, num_tokens: int) -> int:
        """The first position a query after ``num_tokens`` computed tokens may read."""
        return 0 if self.window is None else max(0, num_tokens - self.window + 1)

    def _write(self, sid: int, new_tokens: list[int]) -> bool:
        tokens = self.seqs[sid]
        start = len(tokens)
        if not self.coord.allocate(sid, start, start + len(new_tokens)):
            return False
        self._apply_ops()
        live = [i for i, b in enumerate(self.kv.tables[sid]) if b is not None]
        assert live == list(range(self._first_read(start) // BLOCK, (start + len(new_tokens) - 1) // BLOCK + 1)), \
            "a sequence holds exactly the blocks from its window's first to its last token"
        table = self.kv.block_ids(sid)
        for i, tok in enumerate(new_tokens, start):
            self.slots[(table[i // BLOCK], i % BLOCK)] = tok
        tokens.extend(new_tokens)
        if sid not in self.compacted:
            self.kv.cache_computed(sid, tokens, len(tokens))
        return True

    # ---- rules ----------------------------------------------------------------------------------
    @rule(prompts=st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=14), min_size=1, max_size=3))
    def add_sequences(self, prompts: list[list[int]]) -> None:
        """Admit one to three new sequences at once (a recomputed n > 1 request), each reusing its cached prefix."""
        sids = list(range(self.next_id, self.next_id + len(prompts)))
        self.next_id += len(prompts)
        hits = [self.coord.computed_prefix(p) for p in prompts]
        before = self.kv.num_free_blocks
        if not self.coord.admit([(sid, len(p), hit) for sid, p, hit in zip(sids, prompts, hits)]):
            assert self.kv.num_free_blocks == before and not any(sid in self.kv.tables for sid in sids), "a failed admission must change nothing"
            return
        self._apply_ops()
        for sid, prompt, hit in zip(sids, prompts, hits):
            # a prefix hit must hold exactly the prompt's leading tokens (those its window reads), even after the group's other allocations
            done = hit.num_tokens
            table = self.kv.block_ids(sid)
            for i in range(self._first_read(done), done):
                assert self.slots[(table[i // BLOCK], i % BLOCK)] == prompt[i]
            self.seqs[sid] = list(prompt[:done])
        for sid, prompt, hit in zip(sids, prompts, hits):
            table = self.kv.block_ids(sid)
            for i in range(hit.num_tokens, len(prompt)):
                self.slots[(table[i // BLOCK], i % BLOCK)] = prompt[i]
            self.seqs[sid] = list(prompt)
            self.kv.cache_computed(sid, prompt, len(prompt))

    @precondition(lambda self: self.seqs)
    @rule(data=st.data(), new=st.lists(st.integers(0, 3), min_size=1, max_size=6))
    def append(self, data, new: list[int]) -> None:
        sid = data.draw(st.sampled_from(sorted(self.seqs)))
        before = self.kv.num_free_blocks
        if not self._write(sid, new):
            # a failed allocation takes nothing; a window may still have given back what it passed
            assert self.kv.num_free_blocks == before or (self.window and self.kv.num_free_blocks > before), "a failed allocation took blocks"

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def fork(self, data) -> None:
        parent = data.draw(st.sampled_from(sorted(self.seqs)))
        child = self.next_id
        self.next_id += 1
        self.coord.fork(parent, child)
        self.seqs[child] = list(self.seqs[parent])
        if parent in self.compacted:
            self.compacted.add(child)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def free(self, data) -> None:
        sid = data.draw(st.sampled_from(sorted(self.seqs)))
        self.coord.free(sid)
        del self.seqs[sid]
        self.compacted.discard(sid)

    @precondition(lambda self: set(self.seqs) - self.compacted)
    @rule(data=st.data())
    def checkpoint(self, data) -> None:
        sid = data.draw(st.sampled_from(sorted(set(self.seqs) - self.compacted)))
        self.checkpoints.append(self.coord.checkpoint(sid, self.seqs[sid]))

    @precondition(lambda self: self.checkpoints)
    @rule(data=st.data(), rest=st.lists(st.integers(0, 3), min_size=1, max_size=6))
    def resume(self, data, rest: list[int]) -> None:
        """A new sequence starts from a checkpoint (which may end inside a block) and writes on from there."""
        ckpt = data.draw(st.sampled_from(self.checkpoints))
        sid = self.next_id
        self.next_id += 1
        done = list(ckpt.token_ids)
        before = self.kv.num_free_blocks
        if not self.coord.admit([(sid, len(done) + len(rest), self.coord.resume_hit(ckpt))]):
            assert self.kv.num_free_blocks == before and sid not in self.kv.tables, "a failed admission must change nothing"
            return
        self._apply_ops()
        table = self.kv.block_ids(sid)
        for i, tok in enumerate(rest, len(done)):
            self.slots[(table[i // BLOCK], i % BLOCK)] = tok
        self.seqs[sid] = done + rest
        self.kv.cache_computed(sid, self.seqs[sid], len(self.seqs[sid]))

    @precondition(lambda self: self.checkpoints)
    @rule(data=st.data())
    def release_checkpoint(self, data) -> None:
        ckpt = self.checkpoints.pop(data.draw(st.integers(0, len(self.checkpoints) - 1)))
        self.coord.release(ckpt)
        self.coord.release(ckpt)  # a second release does nothing

    @precondition(lambda self: self.window is None and self.seqs)
    @rule(data=st.data())
    def compact(self, data) -> None:
        """A KV method keeps some of a sequence's tokens: they move into fresh blocks, its old blocks go back (or stay with
        their other holders, unchanged), and it writes on after the kept ones."""
        sid = data.draw(st.sampled_from(sorted(self.seqs)))
        tokens = self.seqs[sid]
        keep = sorted(data.draw(st.sets(st.integers(0, len(tokens) - 1), min_size=1, max_size=len(tokens))))
        before = self.kv.num_free_blocks
        if not self.coord.compact(sid, torch.tensor(keep).view(1, 1, -1)):
            assert self.kv.num_free_blocks == before, "a compaction that cannot be done changes nothing"
            return
        self._apply_ops()
        self.seqs[sid] = [tokens[p] for p in keep]
        self.compacted.add(sid)

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
            first = self._first_read(len(tokens))
            got = [self.slots.get((table[i // BLOCK], i % BLOCK)) for i in range(first, len(tokens))]
            assert got == tokens[first:], f"seq {sid} reads {got}, wrote {tokens[first:]}"

    @invariant()
    def every_checkpoint_keeps_its_tokens(self) -> None:
        for ckpt in self.checkpoints:
            table, tokens = ckpt.blocks[0], list(ckpt.token_ids)
            first = self._first_read(len(tokens))
            got = [self.slots.get((table[i // BLOCK].block_id, i % BLOCK)) for i in range(first, len(tokens))]
            assert got == tokens[first:], f"a checkpoint reads {got}, was taken at {tokens[first:]}"

    def _held(self) -> list[list]:
        return list(self.kv.tables.values()) + [c.blocks[0] for c in self.checkpoints]

    @invariant()
    def reference_counts_match_tables(self) -> None:
        refs = Counter(b.block_id for t in self._held() for b in t if b is not None)
        for block in self.kv.pool.blocks:
            assert block.ref_count == refs.get(block.block_id, 0)

    @invariant()
    def no_leak_no_double_free(self) -> None:
        free_ids = [b.block_id for b in self.kv.pool._free] + list(self.kv.prefix_cache._lru)
        assert len(free_ids) == len(set(free_ids)), "a block is free twice"
        in_use = {b.block_id for t in self._held() for b in t if b is not None}
        assert not in_use & set(free_ids), "a referenced block is on a free list"
        assert len(in_use) + len(free_ids) == NUM_BLOCKS, "a block leaked"

    @invariant()
    def cached_blocks_hold_their_tokens(self) -> None:
        """Whatever the prefix cache indexes must still hold, slot for slot, the tokens it was indexed for."""
        pc = self.kv.prefix_cache
        for block_id, node in pc._node_of.items():
            assert node.block.block_id == block_id and pc._by_key[node.key] is node
            assert node.tokens == tuple(self.slots.get((block_id, off)) for off in range(BLOCK))

    @invariant()
    def ghosts_live_only_while_named(self) -> None:
        """A prefix whose block was evicted is kept only while a later cached prefix names it as parent."""
        pc = self.kv.prefix_cache
        named = Counter(id(node.parent) for node in pc._by_key.values() if node.parent is not None)
        for node in pc._by_key.values():
            assert node.children == named[id(node)]
            assert node.block is not None or node.children > 0, "an evicted prefix nothing names must be forgotten"

    @invariant()
    def only_unreferenced_cached_blocks_are_evictable(self) -> None:
        pc = self.kv.prefix_cache
        for block_id, block in pc._lru.items():
            assert block.ref_count == 0 and block_id in pc._node_of
        cached_unused = {b.block_id for b in self.kv.pool.blocks if b.ref_count == 0 and b.block_id in pc._node_of}
        assert cached_unused == set(pc._lru), "every unreferenced cached block is the prefix cache's to evict"


class ConstantKeyMachine(KVCacheMachine):
    """The same rules with every block keyed alike: each key collides, and every hit must still be the right prefix."""

    def __init__(self) -> None:
        super().__init__()
        self.kv.prefix_cache.key_of = lambda parent, tokens: 0


class SlidingWindowMachine(KVCacheMachine):
    """The same rules over a sliding-window group: blocks leave as the window passes, prefix hits skip evicted early blocks."""

    window = WINDOW


class SlidingWindowConstantKeyMachine(SlidingWindowMachine):
    def __init__(self) -> None:
        super().__init__()
        self.kv.prefix_cache.key_of = lambda parent, tokens: 0


TestKVCacheManager = KVCacheMachine.TestCase
TestKVCacheManager.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
TestKVCacheManagerUnderCollisions = ConstantKeyMachine.TestCase
TestKVCacheManagerUnderCollisions.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestSlidingWindowManager = SlidingWindowMachine.TestCase
TestSlidingWindowManager.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
TestSlidingWindowManagerUnderCollisions = SlidingWindowConstantKeyMachine.TestCase
TestSlidingWindowManagerUnderCollisions.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_admitting_a_group_never_evicts_a_prefix_another_member_reuses():
    """Hand-worked: four cached prompts A, B, C, D (LRU in that order); X reuses A's block and needs every plain free
    block plus one more, Y reuses B's. Taking X's blocks one member at a time would evict B's block (the oldest not
    in use) and then hand it to Y as its prefix while X writes into it."""
    coord = coordinator(8)
    kv = coord.managers[0]
    prompts = {name: [tok] * BLOCK + [9] for name, tok in (("A", 1), ("B", 2), ("C", 3), ("D", 4))}
    for sid, prompt in enumerate(prompts.values()):
        assert coord.admit([(sid, len(prompt), None)])
        coord.cache_computed(sid, prompt, len(prompt))
    for sid in range(4):
        coord.free(sid)
    plain_free = kv.pool.num_free - kv.pool.num_cached_unused
    x = prompts["A"][:BLOCK] + [5] * (BLOCK * plain_free + 1)
    y = prompts["B"][:BLOCK] + [6]
    px, py = coord.computed_prefix(x), coord.computed_prefix(y)
    assert px.num_tokens == py.num_tokens == BLOCK
    assert coord.admit([(10, len(x), px), (11, len(y), py)])
    assert not set(kv.block_ids(10)) & set(kv.block_ids(11)), "X and Y share no tokens, so no block"
    y_block = py.blocks[0][0]
    assert kv.tables[11][0] is y_block and coord.computed_prefix(prompts["B"]).blocks[0] == [y_block], "Y's prefix block still holds B's tokens"


def test_block_moves_are_done_in_the_order_decided():
    """A copy-on-write whose destination is then swapped out: the host must get the copied K/V, not the old contents."""
    from kvtier.cache.kv_storage import KVStorage
    from kvtier.cache.ops import CacheOps

    spec = FullAttentionSpec(BLOCK, 1, 1, torch.float32)
    plan = MemoryPlan.split([KVCacheGroup(spec, (0,))], 4 * 32, 2 * 32, 4096, 64)  # 4 device, 2 host blocks of 1 layer x 1 head x dim 1
    storage = KVStorage(plan, torch.device("cpu"))
    pools = storage.groups[0].k, storage.groups[0].v
    for pool in pools:
        for b in range(4):
            pool.home[:, :, b * BLOCK:(b + 1) * BLOCK] = float(b)
    ops = CacheOps()
    ops.add("copy", 1, 2)  # block 2 takes block 1's K/V ...
    ops.add("swap_out", 2, 0)  # ... and then goes to host block 0
    ops.add("copy", 3, 2)  # block 2, given back, is reused at once
    assert [kind for kind, _ in ops.runs()] == ["copy", "swap_out", "copy"]
    storage.apply([ops])
    for pool in pools:
        assert pool.swap[:, :, 0:BLOCK].eq(1.0).all()
        assert pool.home[:, :, 2 * BLOCK:3 * BLOCK].eq(3.0).all()
    chained = CacheOps()
    for src, dst in [(0, 1), (1, 2), (3, 0)]:
        chained.add("copy", src, dst)
    assert [pairs for _, pairs in chained.runs()] == [[(0, 1)], [(1, 2), (3, 0)]], "a batch never reads a block it writes"


def test_a_window_gives_back_the_blocks_it_has_passed():
    """Hand-worked, window 6 over blocks of 4: once 12 tokens are computed, the next query (position 12) reads 7..12,
    so block 0 (positions 0-3) goes back to the pool and block 1 (4-7) stays; at 16 computed, block 1 goes too."""
    coord = coordinator(8, window=6)
    kv = coord.managers[0]
    assert coord.admit([(0, 12, None)])
    assert coord.allocate(0, 12, 13)
    assert kv.block_ids(0)[:2] == [-1, 1] and kv.num_free_blocks == 8 - 3
    assert coord.allocate(0, 16, 17)
    assert kv.block_ids(0)[:3] == [-1, -1, 2] and kv.num_free_blocks == 8 - 3


def test_a_sliding_window_hit_needs_only_the_blocks_its_window_reads():
    """Window 6 over blocks of 4. A 24-token sequence grows step by step: its window releases blocks 0, 1, 2 as it
    passes them, and freeing it releases 5, 4, 3. Three evictions then take blocks 0-2. At position 24 the window reads
    only blocks 4 and 5, so the prompt still reuses 6 blocks (full attention, needing block 0, would reuse none). Keys
    that ignore the parent and the first token make a prompt differing only in token 0 collide with every cached block:
    it must not hit, since block 0's evicted prefix is kept as tokens and checked."""
    prompt = list(range(24))
    coord = coordinator(8, window=6)
    kv = coord.managers[0]
    kv.prefix_cache.key_of = lambda parent, tokens: tokens[1:]
    assert coord.admit([(0, 4, None)])
    for done in range(4, 24, 4):
        coord.cache_computed(0, prompt, done)
        assert coord.allocate(0, done, done + 4)
    coord.cache_computed(0, prompt, 24)
    coord.free(0)
    assert list(kv.prefix_cache._lru) == [0, 1, 2, 5, 4, 3]
    taken = [kv.pool.allocate() for _ in range(kv.pool.num_free - 3)]  # the two plain free blocks, then blocks 0, 1, 2
    assert sorted(b.block_id for b in taken) == [0, 1, 2, 6, 7]
    known = kv.cached_prefix(prompt + [99], 6)
    assert [b is None for b in known] == [True] * 3 + [False] * 3
    assert FullAttentionManager.hit_length(kv, known, 6) == 0
    hit = coord.computed_prefix(prompt + [99])
    assert hit.num_tokens == 6 * BLOCK and [b is None for b in hit.blocks[0]] == [True] * 4 + [False] * 2
    assert coord.computed_prefix([100] + prompt[1:] + [99]).num_tokens == 0, "another first block must not reach the same cached tail"
