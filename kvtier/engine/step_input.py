"""One engine step as plain data: everything a model runner needs, and nothing of the scheduler's.

Ids, token lists, block ids and block moves only, so a ``StepInput`` pickles and a runner can live in
another process (tensor parallelism) with its own copy of the KV storage.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvtier.attention.metadata import ScheduledTokens
from kvtier.cache.ops import CacheOps


@dataclass(frozen=True)
class StepInput:
    seqs: tuple[ScheduledTokens, ...]  # each scheduled sequence's new tokens, their start and its blocks
    sample_ids: frozenset[int]  # sequences whose last logits are sampled this step
    prompt_logit_ids: frozenset[int]  # sequences whose logits at every new position are wanted (prompt_logprobs)
    ops: CacheOps  # block moves to do before the forward
