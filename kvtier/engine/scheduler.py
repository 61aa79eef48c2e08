"""Iteration-level scheduling: which sequences compute how many tokens this step.

FCFS with a token budget per step (chunked prefill) and a cap on running requests. When
blocks run out, the latest-arrived running request is preempted whole: swapped to host
memory (``preemption_mode="swap"``, when the host pool has room) or freed and recomputed later.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from kvtier.cache.kv_cache_manager import KVCacheManager
from kvtier.engine.sequence import Request, RequestStatus, Sequence


@dataclass
class Chunk:
    """``num_tokens`` new tokens of ``seq`` starting at position ``start``."""

    request: Request
    seq: Sequence
    start: int
    num_tokens: int


@dataclass
class SchedulerOutput:
    chunks: list[Chunk] = field(default_factory=list)
    to_sample: list[Request] = field(default_factory=list)  # every live sequence ends its prompt/decode this step
    num_preempted: int = 0

    @property
    def empty(self) -> bool:
        return not self.chunks


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int, enable_chunked_prefill: bool, preemption_mode: str) -> None:
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.chunked = enable_chunked_prefill
        self.preemption_mode = preemption_mode
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.swapped: deque[Request] = deque()
        self.watermark = max(1, kv.pool.num_blocks // 100)  # headroom so admissions do not cause immediate preemption
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
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
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
        return out

    def _plan(self, req: Request, budget: int) -> list[tuple[Sequence, int]] | None:
        """Tokens per live sequence: all remaining when the whole request fits, else a chunk that samples nothing."""
        seqs = req.live_seqs
        total = sum(s.num_uncomputed for s in seqs)
        if total <= budget:
            return [(s, s.num_uncomputed) for s in seqs]
        if not self.chunked or budget <= 0:
            return None
        plan = []
        for s in seqs:
            n = min(s.num_uncomputed - 1, budget)
            if n > 0:
                plan.append((s, n))
                budget -= n
        return plan or None

    def _allocate(self, req: Request, plan: list[tuple[Sequence, int]]) -> bool:
        return all(self.kv.allocate(s.seq_id, s.num_computed_tokens, s.num_computed_tokens + n) for s, n in plan)

    def _emit(self, req: Request, plan: list[tuple[Sequence, int]], out: SchedulerOutput) -> int:
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
            s.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)

    def _swap_in(self, budget: int, out: SchedulerOutput) -> int:
        while self.swapped and len(self.running) < self.max_num_seqs:
            req = self.swapped[0]
            seq_ids = [s.seq_id for s in req.live_seqs]
            plan = self._plan(req, budget)
            # room for the swapped blocks plus one new or copied block per sequence
            if plan is None or not self.kv.can_swap_in(seq_ids, reserve=2 * len(seq_ids) + self.watermark):
                break
            self.swapped.popleft()
            self.kv.swap_in(seq_ids)
            if not self._allocate(req, plan):
                raise RuntimeError("allocation failed right after swap-in despite the reserve")
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            budget -= self._emit(req, plan, out)
        return budget

    def _admit(self, budget: int, out: SchedulerOutput) -> None:
        while self.waiting and len(self.running) < self.max_num_seqs and budget > 0:
            req = self.waiting[0]
            prefixes = {}
            for s in req.live_seqs:
                if s.num_computed_tokens == 0 and s.seq_id not in self.kv.tables:
                    prefixes[s.seq_id] = self.kv.computed_prefix(s.token_ids)
            for s in req.live_seqs:
                s.num_computed_tokens = len(prefixes.get(s.seq_id, ())) * self.kv.block_size
            plan = self._plan(req, budget)
            if plan is None or not self._admit_blocks(req, plan, prefixes):
                for s in req.live_seqs:
                    s.num_computed_tokens = 0
                break
            self.waiting.popleft()
            for s in req.live_seqs:
                hit = len(prefixes.get(s.seq_id, ())) * self.kv.block_size
                self.kv.record_prefix_lookup(len(s.token_ids), hit)
            if req.metrics.first_scheduled_time is None:
                req.num_cached_tokens = req.seqs[0].num_computed_tokens
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            budget -= self._emit(req, plan, out)

    def _admit_blocks(self, req: Request, plan: list[tuple[Sequence, int]], prefixes: dict) -> bool:
        """Allocate every planned sequence (keeping the watermark free) or none."""
        planned = dict((s.seq_id, n) for s, n in plan)
        wanted = [(s.seq_id, s.num_computed_tokens + planned.get(s.seq_id, 0), prefixes.get(s.seq_id, ())) for s in req.live_seqs]
        return self.kv.admit(wanted, reserve=self.watermark if self.running else 0)
