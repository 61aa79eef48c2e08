"""Replay a trace through a prefix tree without a model, as Marconi's authors evaluate it: requests in time order,
each looked up (its reusable prefix counted as hit tokens, its FLOPs as saved) and then cached with its output.

Marconi's alpha is tuned as the authors' code does (``config_tuner.py``): it starts at 0; at the first eviction a
bootstrap window of ``bootstrap_multiplier`` x the requests seen so far opens; when it has passed, every request so
far is replayed from an empty tree once per alpha in {0, 0.1, ..., 2.0}, and the alpha that saves the most FLOPs over
the last 500 of them is kept (ties: the smallest, so the choice does not depend on the order replays finish).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from kvtier.prefix.costs import HybridCosts
from kvtier.prefix.radix_tree import Policy, RadixTree

ALPHAS = tuple(round(0.1 * i, 1) for i in range(21))
TUNING_TAIL = 500  # requests whose FLOPs saved decide alpha


@dataclass
class Replay:
    policy: Policy  # as it ended (a tuned alpha in it)
    tuned: bool = False
    tuned_at: int | None = None  # requests replayed when alpha was chosen
    input_tokens: list[int] = field(default_factory=list)  # per request
    hit_tokens: list[int] = field(default_factory=list)
    flops_saved: list[float] = field(default_factory=list)
    evictions: int = 0

    @property
    def token_hit_rate(self) -> float:
        """Input tokens that skip prefill / all input tokens."""
        return sum(self.hit_tokens) / max(1, sum(self.input_tokens))

    def summary(self) -> dict:
        p = self.policy
        return {"policy": p.name, "alpha": p.alpha, "tuned": self.tuned, "candidates": p.candidates, "refresh": p.refresh, "requests": len(self.input_tokens),
                "token_hit_rate": self.token_hit_rate, "flops_saved": sum(self.flops_saved), "evictions": self.evictions}


def replay(records: Sequence[dict], costs: HybridCosts, capacity_bytes: int, policy: Policy, tune: bool = False,
           bootstrap_multiplier: int = 5) -> Replay:
    """Every request of ``records`` (time order) through a tree of ``capacity_bytes`` under ``policy``; ``tune`` starts
    alpha at 0 and tunes it as above."""
    tree = RadixTree(costs, capacity_bytes, replace(policy, alpha=0.0) if tune else policy)
    out = Replay(tree.policy, tuned=tune)
    tune_at = None
    for i, r in enumerate(records):
        _serve(tree, r, out)
        if tune and tune_at is None and tree.evictions:
            tune_at = (i + 1) * (1 + bootstrap_multiplier)
        if tune and i + 1 == tune_at:
            tree.policy = out.policy = replace(policy, alpha=tune_alpha(records[: i + 1], costs, capacity_bytes, policy))
            out.tuned_at = i + 1
    out.evictions = tree.evictions
    return out


def _serve(tree: RadixTree, record: dict, out: Replay) -> None:
    prompt = record["input_tokens"]
    hit = tree.match(prompt)
    out.input_tokens.append(len(prompt))
    out.hit_tokens.append(hit)
    out.flops_saved.append(tree.costs.prefill_flops(hit))
    tree.admit(prompt, record["output_tokens"])


def tune_alpha(records: Sequence[dict], costs: HybridCosts, capacity_bytes: int, policy: Policy) -> float:
    """The alpha of the grid whose replay of ``records`` from an empty tree saves the most FLOPs over the last
    ``TUNING_TAIL`` of them (ties: the smallest)."""
    def tail(alpha: float) -> float:
        return sum(replay(records, costs, capacity_bytes, replace(policy, alpha=alpha)).flops_saved[-TUNING_TAIL:])

    return max(ALPHAS, key=lambda a: (tail(a), -a))
