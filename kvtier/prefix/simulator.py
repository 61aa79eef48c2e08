"""Replay a trace through a prefix tree without a model, as Marconi's authors evaluate it: requests in time order,
each looked up (its reusable prefix counted as hit tokens, its FLOPs as saved) and then cached with its output.

Marconi's alpha is tuned as the authors' code does (``config_tuner.py``): it starts at 0; at the first eviction a
bootstrap window of ``bootstrap_multiplier`` x the requests seen so far opens; when it has passed, every request so
far is replayed from an empty tree once per alpha in {0, 0.1, ..., 2.0}, and the alpha that saves the most FLOPs over
the last 500 of them is kept (ties: the smallest, so the choice does not depend on the order replays finish).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from kvtier.prefix.costs import HybridCosts
from kvtier.prefix.radix_tree import Policy, RadixTree

ALPHAS = tuple(round(0.1 * i, 1) for i in range(21))
TUNING_TAIL = 500  # requests whose FLOPs saved decide alpha


@dataclass
class Replay:
    policy: str
    alpha: float | None  # marconi: the alpha tuned (or given)
    input_tokens: list[int] = field(default_factory=list)  # per request
    hit_tokens: list[int] = field(default_factory=list)
    flops_saved: list[float] = field(default_factory=list)
    evictions: int = 0

    @property
    def token_hit_rate(self) -> float:
        """Input tokens that skip prefill / all input tokens."""
        return sum(self.hit_tokens) / max(1, sum(self.input_tokens))

    def summary(self) -> dict:
        return {"policy": self.policy, "alpha": self.alpha, "requests": len(self.input_tokens), "token_hit_rate": self.token_hit_rate,
                "flops_saved": sum(self.flops_saved), "evictions": self.evictions}


def replay(records: Sequence[dict], costs: HybridCosts, capacity_bytes: int, policy: str, alpha: float | None = None,
           block_size: int = 32, bootstrap_multiplier: int = 5) -> Replay:
    """Every request of ``records`` (time order) through a tree of ``capacity_bytes``. For ``marconi``, ``alpha`` None
    tunes it as above; a number fixes it."""
    tuned = policy == "marconi" and alpha is None
    tree = RadixTree(costs, capacity_bytes, Policy(policy, alpha=alpha or 0.0, block_size=block_size))
    out = Replay(policy, alpha if policy == "marconi" else None)
    tune_at = None
    for i, r in enumerate(records):
        _serve(tree, r, out)
        if tuned and tune_at is None and tree.evictions:
            tune_at = (i + 1) * (1 + bootstrap_multiplier)
        if tuned and tune_at is not None and i + 1 == tune_at:
            best = max(ALPHAS, key=lambda a: (_tail_flops(records[: i + 1], costs, capacity_bytes, a, block_size), -a))
            tree.policy = Policy("marconi", alpha=best, block_size=block_size)
            out.alpha = best
            tuned = False
    if policy == "marconi" and out.alpha is None:
        out.alpha = 0.0  # never evicted, never tuned: alpha is its starting 0
    out.evictions = tree.evictions
    return out


def _serve(tree: RadixTree, record: dict, out: Replay) -> None:
    prompt = record["input_tokens"]
    hit = tree.match(prompt)
    out.input_tokens.append(len(prompt))
    out.hit_tokens.append(hit)
    out.flops_saved.append(tree.costs.prefill_flops(hit))
    tree.admit(prompt, record["output_tokens"])


def _tail_flops(records: Sequence[dict], costs: HybridCosts, capacity_bytes: int, alpha: float, block_size: int) -> float:
    r = replay(records, costs, capacity_bytes, "marconi", alpha, block_size)
    return sum(r.flops_saved[-TUNING_TAIL:])
