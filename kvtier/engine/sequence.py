"""A request and the sequences it grows (one, ``n`` parallel samples, or beams)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from enum import Enum

import torch

from kvtier.cache.checkpoint import StateCheckpoint
from kvtier.outputs import Logprob, PromptLogprobs, RequestMetrics
from kvtier.sampling_params import BeamSearchParams, SamplingParams

_seq_ids = itertools.count()


class RequestStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    SWAPPED = "swapped"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    token_ids: list[int]
    prompt_len: int
    index: int = 0  # position among the request's outputs
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    num_computed_tokens: int = 0
    cumulative_logprob: float = 0.0
    logprobs: list[dict[int, Logprob]] | None = None
    generator: torch.Generator | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    text: str = ""
    detokenizer: object | None = None  # IncrementalDetokenizer while text is needed token by token
    checkpoint_at: list[int] = field(default_factory=list)  # positions (tokens computed) whose cache state to keep, ascending
    cache_state_at: list[int] = field(default_factory=list)  # positions whose state the prefix cache wants kept, ascending
    compress_at: int | None = None  # where a KV method evicts (the prompt's end); a chunk stops there, recomputed or not
    compute_from: int | None = None  # a prefix hit stops here: a KV method reads the queries of the tokens from here on
    num_evicted: int = 0  # tokens a KV method dropped from the cache: token at position p >= the prompt's end is in slot p - num_evicted
    # per layer and KV head, the position of the token in each cache slot at the last compaction ([layers, kv_heads, slots]);
    # a slot past them holds the token at its index + num_evicted. None until a KV method evicts.
    slot_positions: torch.Tensor | None = None

    def until_checkpoint(self, n: int) -> int:
        """``n`` new tokens, or fewer so that a chunk stops at the next checkpoint or compression position."""
        stops = [*self.checkpoint_at, *self.cache_state_at, *(() if self.compress_at is None else (self.compress_at,))]
        ahead = [p for p in stops if p > self.num_computed_tokens]
        return min(n, min(ahead) - self.num_computed_tokens) if ahead else n

    @property
    def num_cached_slots(self) -> int:
        """Cache slots the computed tokens take: fewer than the tokens once a KV method evicted some."""
        return self.num_computed_tokens - self.num_evicted

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len :]

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def fork(self, index: int) -> Sequence:
        return Sequence(
            token_ids=list(self.token_ids),
            prompt_len=self.prompt_len,
            index=index,
            num_computed_tokens=self.num_computed_tokens,
            compress_at=self.compress_at,
            compute_from=self.compute_from,
            num_evicted=self.num_evicted,
            slot_positions=self.slot_positions,
            cumulative_logprob=self.cumulative_logprob,
            logprobs=None if self.logprobs is None else list(self.logprobs),
            text=self.text,
        )


@dataclass(eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    metrics: RequestMetrics
    beam: BeamSearchParams | None = None
    seqs: list[Sequence] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    prompt_logprobs: PromptLogprobs | None = None
    num_cached_tokens: int = 0
    forked: bool = False  # n > 1: children split off after the first sample
    finished_beams: list[Sequence] = field(default_factory=list)
    stream: bool = False
    start_from: StateCheckpoint | None = None  # the request's own hold on the checkpoint its prompt resumes from

    @property
    def live_seqs(self) -> list[Sequence]:
        return [s for s in self.seqs if not s.finished]

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED

    def wants_prompt_logits(self, seq: Sequence, start: int) -> bool:
        """Whether a chunk of ``seq`` from ``start`` needs logits at every position: prompt_logprobs not yet all computed."""
        prompt_len = self.seqs[0].prompt_len
        return (self.params.prompt_logprobs is not None and seq.index == 0 and start < prompt_len - 1
                and (self.prompt_logprobs is None or len(self.prompt_logprobs) < prompt_len))
