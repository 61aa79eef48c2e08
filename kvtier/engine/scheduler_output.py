"""What the scheduler hands the model runner for one step, as plain data (after vLLM v1's ``SchedulerOutput``).

Ids, token lists, block ids per layer group and cache moves (block copies and swaps, a KV method's compactions) only, so
a ``SchedulerOutput`` pickles and a runner can live in another process (tensor parallelism) with its own copy of the KV
storage.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvtier.attention.metadata import ScheduledTokens
from kvtier.cache.ops import CacheOps


@dataclass(frozen=True)
class SchedulerOutput:
    seqs: tuple[ScheduledTokens, ...]  # each scheduled sequence's new tokens, their start and its blocks per layer group
    sample_ids: frozenset[int]  # sequences whose last logits are sampled this step
    prompt_logit_ids: frozenset[int]  # sequences whose logits at every new position are wanted (prompt_logprobs)
    ops: tuple[CacheOps, ...]  # per layer group, the block moves to do before the forward
    # seq_id -> (first token of its chunk, count): queries (after RoPE) to hand back, for a KV method that reads them
    query_rows: dict[int, tuple[int, int]] = field(default_factory=dict)
