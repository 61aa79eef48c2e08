"""Property tests of the Mamba2 state slots behind the coordinator: random admit / step / fork / free / swap out /
swap in / checkpoint / resume / release sequences never leak or double-free a slot (device or host), keep
reference counts equal to the table and checkpoint references, and never let one sequence's step change the state
another sequence or a checkpoint holds.

The test keeps its own model of each slot's state (the tokens it has consumed), applies the manager's copy and swap
orders as the worker would, and then writes each stepped sequence's slot as the model does.
"""

from __future__ import annotations

from collections import Counter

import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvtier.cache.checkpoint import StateCheckpoint
from kvtier.cache.coordinator import KVCacheCoordinator
from kvtier.cache.memory_plan import MemoryPlan
from kvtier.cache.specs import KVCacheGroup, MambaSpec

SLOTS, HOST_SLOTS = 6, 4
SPEC = MambaSpec(4, (2, 3), (1, 2, 2), torch.float32, torch.float32)  # 24 + 16 bytes a slot
TOKENS = st.lists(st.integers(0, 3), min_size=1, max_size=5)


class StateSlotMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        slot = SPEC.bytes_per_block
        plan = MemoryPlan.split([KVCacheGroup(SPEC, (0,))], SLOTS * slot, HOST_SLOTS * slot, 4096, 64)
        assert (plan.groups[0].num_blocks, plan.groups[0].num_host_blocks) == (SLOTS, HOST_SLOTS)
        self.coord = KVCacheCoordinator(plan, 64, enable_prefix_caching=False)
        self.m = self.coord.managers[0]
        self.state: dict[tuple[str, int], tuple[int, ...]] = {}  # ("device" | "host", slot) -> tokens its state has consumed
        self.seqs: dict[int, list[int]] = {}  # every live sequence, on device or swapped out
        self.checkpoints: list[StateCheckpoint] = []
        self.next_id = 0

    def _apply_ops(self) -> None:
        where = {"copy": ("device", "device"), "swap_out": ("device", "host"), "swap_in": ("host", "device")}
        for kind, src, dst in self.coord.take_ops()[0].moves:
            a, b = where[kind]
            self.state[(b, dst)] = self.state[(a, src)]

    def _slot(self, sid: int) -> int:
        [slot] = self.m.block_ids(sid)
        return slot

    def _on_device(self) -> list[int]:
        return sorted(s for s in self.seqs if s in self.m.tables)

    # ---- rules ----------------------------------------------------------------------------------
    @rule(prompts=st.lists(TOKENS, min_size=1, max_size=3))
    def admit(self, prompts: list[list[int]]) -> None:
        sids = list(range(self.next_id, self.next_id + len(prompts)))
        self.next_id += len(prompts)
        before = self.m.pool.num_free
        if not self.coord.admit([(sid, len(p), None) for sid, p in zip(sids, prompts)]):
            assert self.m.pool.num_free == before and not any(sid in self.m.tables for sid in sids), "a failed admission must change nothing"
            return
        self._apply_ops()
        for sid, prompt in zip(sids, prompts):
            self.state[("device", self._slot(sid))] = tuple(prompt)  # a fresh slot starts at zero and takes the prompt
            self.seqs[sid] = list(prompt)

    @precondition(lambda self: self._on_device())
    @rule(data=st.data(), new=TOKENS)
    def step(self, data, new: list[int]) -> None:
        sid = data.draw(st.sampled_from(self._on_device()))
        done = len(self.seqs[sid])
        before = self.m.pool.num_free
        if not self.coord.allocate(sid, done, done + len(new)):
            assert self.m.pool.num_free == before, "a failed allocation took a slot"
            return
        self._apply_ops()
        self.seqs[sid] += new
        self.state[("device", self._slot(sid))] = tuple(self.seqs[sid])

    @precondition(lambda self: self._on_device())
    @rule(data=st.data())
    def fork(self, data) -> None:
        parent = data.draw(st.sampled_from(self._on_device()))
        self.coord.fork(parent, self.next_id)
        self.seqs[self.next_id] = list(self.seqs[parent])
        self.next_id += 1

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def free(self, data) -> None:
        sid = data.draw(st.sampled_from(sorted(self.seqs)))
        self.coord.free(sid)
        del self.seqs[sid]

    @precondition(lambda self: self._on_device())
    @rule(data=st.data())
    def swap_out(self, data) -> None:
        sids = data.draw(st.lists(st.sampled_from(self._on_device()), min_size=1, max_size=2, unique=True))
        if self.coord.can_swap_out(sids):
            self.coord.swap_out(sids)
            self._apply_ops()

    @precondition(lambda self: any(s not in self.m.tables for s in self.seqs))
    @rule(data=st.data())
    def swap_in(self, data) -> None:
        sid = data.draw(st.sampled_from(sorted(s for s in self.seqs if s not in self.m.tables)))
        if self.coord.can_swap_in([sid]):
            self.coord.swap_in([sid])
            self._apply_ops()

    @precondition(lambda self: self._on_device())
    @rule(data=st.data())
    def checkpoint(self, data) -> None:
        sid = data.draw(st.sampled_from(self._on_device()))
        self.checkpoints.append(self.coord.checkpoint(sid, self.seqs[sid]))

    @precondition(lambda self: self.checkpoints)
    @rule(data=st.data(), rest=TOKENS)
    def resume(self, data, rest: list[int]) -> None:
        ckpt = data.draw(st.sampled_from(self.checkpoints))
        sid = self.next_id
        self.next_id += 1
        before = self.m.pool.num_free
        if not self.coord.admit([(sid, ckpt.num_tokens + len(rest), self.coord.resume_hit(ckpt))]):
            assert self.m.pool.num_free == before and sid not in self.m.tables, "a failed admission must change nothing"
            return
        self._apply_ops()
        assert self.state[("device", self._slot(sid))] == ckpt.token_ids, "a resumed sequence starts from the checkpoint's state"
        self.seqs[sid] = list(ckpt.token_ids) + rest
        self.state[("device", self._slot(sid))] = tuple(self.seqs[sid])

    @precondition(lambda self: self.checkpoints)
    @rule(data=st.data())
    def release(self, data) -> None:
        self.coord.release(self.checkpoints.pop(data.draw(st.integers(0, len(self.checkpoints) - 1))))

    # ---- invariants -----------------------------------------------------------------------------
    @invariant()
    def every_sequence_and_checkpoint_keeps_its_state(self) -> None:
        for sid, tokens in self.seqs.items():
            where, table = ("device", self.m.tables[sid]) if sid in self.m.tables else ("host", self.m.host_tables[sid])
            assert self.state[(where, table[0].block_id)] == tuple(tokens), f"seq {sid}'s {where} slot lost its state"
        for ckpt in self.checkpoints:
            assert self.state[("device", ckpt.blocks[0][0].block_id)] == ckpt.token_ids

    @invariant()
    def reference_counts_match_and_nothing_leaks(self) -> None:
        for pool, tables in ((self.m.pool, [*self.m.tables.values(), *(c.blocks[0] for c in self.checkpoints)]),
                             (self.m.host_pool, list(self.m.host_tables.values()))):
            refs = Counter(b.block_id for t in tables for b in t)
            assert all(len(t) == 1 for t in tables), "a sequence holds exactly one slot"
            for block in pool.blocks:
                assert block.ref_count == refs.get(block.block_id, 0)
            free = [b.block_id for b in pool._free]
            assert len(free) == len(set(free)), "a slot is free twice"
            assert not set(free) & set(refs) and len(free) + len(refs) == pool.num_blocks, "a slot leaked or is free while held"


TestStateSlots = StateSlotMachine.TestCase
TestStateSlots.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
