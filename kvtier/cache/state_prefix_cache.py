"""Prefix caching in a radix tree: the tree of :mod:`kvtier.prefix` (the simulator's own tree and policies) whose
states are the engine's state checkpoints.

A node's payload is a :class:`~kvtier.cache.checkpoint.StateCheckpoint` of exactly its prefix: the Mamba2 state slot
as it was after its last token and the K/V blocks of every token before it (blocks several checkpoints share are
held once, by reference count). A hit resumes from the deepest matched node's checkpoint, as ``start_from`` does.
Which states the engine takes is the policy's: for ``sglang+`` and ``marconi`` the one where the prompt leaves the
tree (found before its prefill, taken when a chunk ends there) and the one after the last computed token; for
``vllm+`` one at every block boundary. An attention-only model uses the same tree with ``vllm+``'s rules (LRU over
leaves, a node per block), named ``lru``: its checkpoints hold K/V blocks alone, so the states of every block boundary
a chunk has passed are taken after it, and its prefill never stops for them. The tree's capacity is counted with the
model's real bytes, and when a pool runs short the scheduler asks for room (``reclaim``) before it preempts anyone:
the policy's next victim gives its checkpoint back. A state goes into the tree as soon as it is taken, during its sequence's prefill or decode
(as vLLM and SGLang cache a block when it fills), so that whatever the states hold can be reclaimed and a preempted
sequence resumes from its own states. Marconi's alpha is tuned as in the simulator, over the requests served so far:
once the bootstrap window after the first eviction has passed, and again after each window as long.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from kvtier.cache.checkpoint import StateCheckpoint
from kvtier.prefix.costs import HybridCosts
from kvtier.prefix.radix_tree import Policy, RadixTree
from kvtier.prefix.simulator import tune_alpha

if TYPE_CHECKING:
    from kvtier.cache.coordinator import KVCacheCoordinator, PrefixHit

TUNING_HISTORY = 2_000  # the most recent requests a tuning replays


class StatePrefixCache:
    def __init__(self, kv: KVCacheCoordinator, costs: HybridCosts, capacity_bytes: int, policy: Policy, tune: bool = False,
                 bootstrap_multiplier: int = 5) -> None:
        self.kv = kv
        self.tree = RadixTree(costs, capacity_bytes, policy, on_release=self._release)
        # per layer group, how many of the tree's checkpoints hold each block (by id), kept as they come and go so the
        # engine's per-step metrics need not walk the tree
        self._pins: list[dict[int, list]] = [{} for _ in kv.managers]  # id(block) -> [block, checkpoints holding it]
        self.tune = tune
        self.bootstrap_multiplier = bootstrap_multiplier
        self.history: list[dict] = []  # the latest served requests, as the simulator's records (when tuning)
        self.served = 0
        self.tunings: list[tuple[int, float]] = []  # (requests served, alpha chosen)
        self._window: int | None = None  # requests between tunings, set at the first eviction
        self._next_tuning: int | None = None

    @property
    def block_states(self) -> bool:
        """vLLM+: a state at every block boundary, prompt and output alike."""
        return self.tree.policy.name == "vllm+"

    @property
    def stateful(self) -> bool:
        """Whether a checkpoint holds a recurrent state, which exists only where a chunk ends (K/V blocks alone serve
        any boundary a chunk has passed)."""
        return self.tree.costs.state_bytes > 0

    def state_positions(self, prompt: Sequence[int]) -> list[int]:
        """Where this prompt's prefill stops to keep a state for the tree (speculative insertion; vLLM+: every block)."""
        if not self.stateful:
            return []
        if self.block_states:
            return list(range(self.tree.unit, len(prompt) + 1, self.tree.unit))
        branch = self.tree.branch_point(prompt)
        return [] if branch is None else [branch]

    def hit(self, token_ids: Sequence[int]) -> PrefixHit | None:
        """The deepest checkpoint whose tokens ``token_ids`` starts with, as a prefix hit (None: none)."""
        node = self.tree.lookup(token_ids)
        return None if node.payload is None else self.kv.resume_hit(node.payload)

    def states_after(self, start: int, n: int, prompt_len: int, wanted: Sequence[int]) -> list[int]:
        """The lengths whose states to take once a chunk from ``start`` has computed ``n`` tokens: the positions asked
        before the prefill (``wanted``), vLLM+'s block boundaries past the prompt, and, without a recurrent state, every
        block boundary the chunk passed."""
        unit = self.tree.unit
        if not self.stateful:
            return list(range(unit * (start // unit + 1), n + 1, unit))
        return [n] if n in wanted or (self.block_states and n > prompt_len and n % unit == 0) else []

    def take(self, seq_id: int, token_ids: Sequence[int], lengths: Sequence[int]) -> None:
        """Cache the states of a sequence that has computed ``token_ids`` at ``lengths`` (the tree keeps what its policy
        admits and releases the rest, a state it holds already among them)."""
        states = {n: self.kv.checkpoint(seq_id, token_ids[:n]) for n in lengths}
        for ckpt in states.values():
            self._pin(ckpt, 1)
        self.tree.insert(token_ids[: max(lengths)], states)

    def keep(self, seq_id: int, token_ids: Sequence[int], prompt_len: int) -> None:
        """Cache a served sequence's computed ``token_ids`` with the state after its last token (not taken where the tree
        keeps no node: inside a block, for vLLM+'s rules)."""
        if len(token_ids) % self.tree.unit == 0:
            self.take(seq_id, token_ids, [len(token_ids)])
        if self.tune:
            self.history.append({"input_tokens": list(token_ids[:prompt_len]), "output_tokens": list(token_ids[prompt_len:])})
            del self.history[:-TUNING_HISTORY]
            self._maybe_tune()

    def cached_blocks(self) -> list[int]:
        """Per layer group, the blocks (slots) only the tree's checkpoints hold: cached, not in use, given back on demand."""
        return [sum(1 for block, n in pins.values() if block.ref_count == n) for pins in self._pins]

    def _pin(self, ckpt: StateCheckpoint, delta: int) -> None:
        for pins, table in zip(self._pins, ckpt.blocks):
            for b in table:
                if b is not None:
                    entry = pins.setdefault(id(b), [b, 0])
                    entry[1] += delta
                    if not entry[1]:
                        del pins[id(b)]

    def _release(self, ckpt: StateCheckpoint) -> None:
        """The tree gives a checkpoint up (evicted, a duplicate, or not admitted)."""
        self._pin(ckpt, -1)
        self.kv.release(ckpt)

    def reclaim(self) -> bool:
        """Give back the policy's next victim; False when the tree holds nothing it can evict."""
        return self.tree.evict_one()

    def _maybe_tune(self) -> None:
        self.served += 1
        seen = self.served
        if self._window is None and self.tree.evictions:
            self._window = seen * self.bootstrap_multiplier
            self._next_tuning = seen + self._window
        if self._next_tuning is not None and seen >= self._next_tuning:
            t = self.tree
            t.policy = replace(t.policy, alpha=tune_alpha(self.history, t.costs, t.capacity, t.policy))
            self.tunings.append((seen, t.policy.alpha))
            self._next_tuning = seen + self._window
