"""Iteration-level scheduling: which sequences compute how many tokens this step.

FCFS with a token budget per step (chunked prefill) and a cap on running requests. When
blocks run out, the prefix cache gives back what it holds first (``kv.reclaim``); then the
latest-arrived running request is preempted whole: swapped to host memory
(``preemption_mode="swap"``, when the host pool has room) or freed and recomputed later.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from kvtier.attention.metadata import ScheduledTokens
from kvtier.cache.coordinator import KVCacheCoordinator, PrefixHit
from kvtier.engine.scheduler_output import SchedulerOutput
from kvtier.engine.sequence import Request, RequestStatus, Sequence


@dataclass
class Chunk:
    """``num_tokens`` new tokens of ``seq`` starting at position ``start``."""

    request: Request
    seq: Sequence
    start: int
    num_tokens: int


@dataclass
class StepPlan:
    """The scheduler's decision over live requests, kept by the engine to update them; ``output`` is what the runner gets."""

    chunks: list[Chunk] = field(default_factory=list)
    to_sample: list[Request] = field(default_factory=list)  # every live sequence ends its prompt/decode this step
    num_preempted: int = 0
    output: SchedulerOutput | None = None

    @property
    def empty(self) -> bool:
        return not self.chunks


class Scheduler:
    def __init__(self, kv: KVCacheCoordinator, max_num_seqs: int, max_num_batched_tokens: int, enable_chunked_prefill: bool, preemption_mode: str) -> None:
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.chunked = enable_chunked_prefill
        self.preemption_mode = preemption_mode
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.swapped: deque[Request] = deque()
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def remove(self, request: Request) -> None:
        """Drop a finished or aborted request from whichever queue holds it."""
        for queue in (self.waiting, self.swapped):
            if request in queue:
                queue.remove(request)
        if request in self.running:
            self.running.remove(request)

    # ---- one step --------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        out = StepPlan()
        budget = self.max_num_batched_tokens
        scheduled: list[Request] = []
        queue = list(self.running)
        while queue:
            req = queue.pop(0)
            if req not in self.running:
                continue  # preempted earlier in this loop
            plan = self._plan(req, budget)
            if plan is None:
                continue  # no budget left this step
            while not self._allocate(req, plan):
                if self.kv.reclaim():
                    continue
                victim = self.running[-1]
                self._preempt(victim)
                out.num_preempted += 1
                if victim is req:
                    break
            else:
                budget -= self._emit(req, plan, out)
                scheduled.append(req)
        if not out.num_preempted:
            budget = self._swap_in(budget, out)
        if not self.swapped and not out.num_preempted:
            self._admit(budget, out)
        out.output = self._output(out)
        return out

    def _output(self, plan: StepPlan) -> SchedulerOutput:
        """The plan as the runner's plain data, with the block moves the cache decided for it."""
        seqs = tuple(ScheduledTokens(c.seq.seq_id, c.seq.token_ids[c.start : c.start + c.num_tokens], c.start, self.kv.block_ids(c.seq.seq_id),
                                     c.seq.num_evicted) for c in plan.chunks)
        sample_ids = frozenset(s.seq_id for r in plan.to_sample for s in r.live_seqs)
        want_prompt = frozenset(c.seq.seq_id for c in plan.chunks if c.request.wants_prompt_logits(c.seq, c.start))
        return SchedulerOutput(seqs, sample_ids, want_prompt, self.kv.take_ops())

    def _plan(self, req: Request, budget: int) -> list[tuple[Sequence, int]] | None:
        """Tokens per live sequence: all remaining when the whole request fits, else a chunk that samples nothing.
        A chunk ends at the sequence's next checkpoint position, so its state there can be taken (whatever the budget)."""
        seqs = req.live_seqs
        total = sum(s.num_uncomputed for s in seqs)
        if total <= budget:
            return [(s, s.until_checkpoint(s.num_uncomputed)) for s in seqs]
        if not self.chunked or budget <= 0:
            return None
        plan = []
        for s in seqs:
            n = s.until_checkpoint(min(s.num_uncomputed - 1, budget))
            if n > 0:
                plan.append((s, n))
                budget -= n
        return plan or None

    def _allocate(self, req: Request, plan: list[tuple[Sequence, int]]) -> bool:
        return all(self.kv.allocate(s.seq_id, s.num_cached_slots, s.num_cached_slots + n) for s, n in plan)

    def _emit(self, req: Request, plan: list[tuple[Sequence, int]], out: StepPlan) -> int:
        used = 0
        for s, n in plan:
            out.chunks.append(Chunk(req, s, s.num_computed_tokens, n))
            used += n
        if all(s.num_uncomputed == n for s, n in plan) and len(plan) == len(req.live_seqs):
            out.to_sample.append(req)
        return used

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.num_preemptions += 1
        seq_ids = [s.seq_id for s in req.live_seqs]
        if self.preemption_mode == "swap" and self.kv.can_swap_out(seq_ids):
            self.kv.swap_out(seq_ids)
            req.status = RequestStatus.SWAPPED
            self.swapped.append(req)
            return
        for s in req.live_seqs:
            self.kv.free(s.seq_id)
            s.num_computed_tokens = s.num_evicted = 0  # recomputed in full, then compressed again where it was
            s.slot_positions = None
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)

    def _swap_in(self, budget: int, out: StepPlan) -> int:
        while self.swapped and len(self.running) < self.max_num_seqs:
            req = self.swapped[0]
            seq_ids = [s.seq_id for s in req.live_seqs]
            plan = self._plan(req, budget)
            while plan is not None and not self.kv.can_swap_in(seq_ids) and self.kv.reclaim():
                pass
            if plan is None or not self.kv.can_swap_in(seq_ids):
                break
            self.swapped.popleft()
            self.kv.swap_in(seq_ids)
            if not self._allocate(req, plan):
                raise RuntimeError("allocation failed right after swap-in despite the reserve")
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            budget -= self._emit(req, plan, out)
        return budget

    def _admit(self, budget: int, out: StepPlan) -> None:
        while self.waiting and len(self.running) < self.max_num_seqs and budget > 0:
            req = self.waiting[0]
            prefixes: dict[int, PrefixHit] = {}
            for s in req.live_seqs:
                if s.num_computed_tokens == 0 and not self.kv.has(s.seq_id):
                    # a hit stops short of the first checkpoint position, so that a chunk ends there and its state is kept, and
                    # of the tokens whose queries a KV method reads
                    limits = [*s.checkpoint_at[:1], *(() if s.compute_from is None else (s.compute_from,))]
                    lookup = s.token_ids[: min(limits)] if limits else s.token_ids
                    prefixes[s.seq_id] = self.kv.resume_hit(req.start_from) if req.start_from else self.kv.computed_prefix(lookup)
            for s in req.live_seqs:
                s.num_computed_tokens = self._hit_tokens(prefixes, s)
            plan = self._plan(req, budget)
            if plan is None or not self._admit_blocks(req, plan, prefixes):
                for s in req.live_seqs:
                    s.num_computed_tokens = 0
                if plan is not None and self.kv.reclaim():
                    continue  # look the prefix up again: the hit itself may have been given back
                break
            self.waiting.popleft()
            for s in req.live_seqs:
                self.kv.record_prefix_lookup(len(s.token_ids), self._hit_tokens(prefixes, s))
            if req.metrics.first_scheduled_time is None:
                req.num_cached_tokens = req.seqs[0].num_computed_tokens
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            budget -= self._emit(req, plan, out)

    def _hit_tokens(self, prefixes: dict[int, PrefixHit], seq: Sequence) -> int:
        hit = prefixes.get(seq.seq_id)
        return hit.num_tokens if hit else 0

    def _admit_blocks(self, req: Request, plan: list[tuple[Sequence, int]], prefixes: dict[int, PrefixHit]) -> bool:
        """Allocate every planned sequence (keeping the watermark free while others run) or none."""
        planned = dict((s.seq_id, n) for s, n in plan)
        wanted = [(s.seq_id, s.num_computed_tokens + planned.get(s.seq_id, 0), prefixes.get(s.seq_id)) for s in req.live_seqs]
        return self.kv.admit(wanted, keep_watermark=bool(self.running))
