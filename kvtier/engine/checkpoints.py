"""State checkpoints asked of the engine: where a request's prefill stops to keep its cache state, the checkpoints
taken until their owner collects them (the caller, or a hybrid's prefix cache), and the checkpoint a request resumes
from.

These are the two operations a prefix cache for hybrid models builds on (Marconi keeps Mamba2 states at chosen
positions): a prefill can stop at any token, even inside an SSD chunk, and hand back the exact state there; a
sequence can start from such a state plus its K/V blocks and compute only the rest of its prompt.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

from kvtier.cache.checkpoint import StateCheckpoint
from kvtier.cache.coordinator import KVCacheCoordinator
from kvtier.engine.sequence import Request, Sequence
from kvtier.errors import InvalidArgumentError


def check_checkpoint_args(prompt: Seq[int], wants_prompt_logprobs: bool, checkpoint_at: Seq[int], start_from: StateCheckpoint | None) -> list[int]:
    """The checkpoint positions, validated against the prompt (and the checkpoint it resumes from)."""
    first = 1
    if start_from is not None:
        if not isinstance(start_from, StateCheckpoint) or start_from.released:
            raise InvalidArgumentError("start_from", "must be a StateCheckpoint from this engine that is not released")
        t = start_from.num_tokens
        if t >= len(prompt) or tuple(prompt[:t]) != start_from.token_ids:
            raise InvalidArgumentError("start_from", f"the prompt must extend the checkpoint's {t} tokens by at least one token")
        if wants_prompt_logprobs:
            raise InvalidArgumentError("start_from", "cannot be combined with prompt_logprobs: the resumed tokens are not recomputed")
        first = t + 1
    positions = list(checkpoint_at)
    if any(not isinstance(p, int) or isinstance(p, bool) for p in positions):
        raise InvalidArgumentError("checkpoint_at", f"must be token positions (ints), got {positions!r}")
    if positions != sorted(set(positions)) or (positions and not first <= positions[0] <= positions[-1] <= len(prompt)):
        raise InvalidArgumentError("checkpoint_at", f"must be strictly increasing positions in [{first}, {len(prompt)}] (tokens computed "
                                   f"when the state is kept), got {positions!r}")
    return positions


class Checkpoints:
    def __init__(self, kv: KVCacheCoordinator) -> None:
        self.kv = kv
        self.taken: dict[str, list[StateCheckpoint]] = {}

    def attach(self, req: Request, seq: Sequence, positions: list[int], start_from: StateCheckpoint | None) -> None:
        """The request holds its own share of ``start_from`` (released when it retires), so the caller may release theirs.
        A hybrid's prefix cache names the positions whose states it wants now, before the prefill (speculative insertion)."""
        seq.checkpoint_at = positions
        if start_from is not None:
            req.start_from = self.kv.share(start_from)
        if self.kv.state_prefix is not None:
            seq.cache_state_at = [p for p in self.kv.state_prefix.state_positions(seq.token_ids) if p > (start_from.num_tokens if start_from else 0)]

    def after_chunk(self, req: Request, seq: Sequence, start: int) -> None:
        """Keep the state when the chunk just computed (from ``start``) ended at the sequence's next checkpoint position,
        and give the prefix cache the states it wants from the chunk (until a KV method compresses the sequence)."""
        n = seq.num_computed_tokens
        if seq.checkpoint_at and n == seq.checkpoint_at[0]:
            seq.checkpoint_at.pop(0)
            self.taken.setdefault(req.request_id, []).append(self.kv.checkpoint(seq.seq_id, seq.token_ids[:n]))
        cache = self.kv.state_prefix
        if cache is None or seq.num_evicted:
            return
        lengths = cache.states_after(start, n, seq.prompt_len, seq.cache_state_at)
        if lengths:
            cache.take(seq.seq_id, seq.token_ids[:n], lengths)

    def keep(self, seq: Sequence) -> None:
        """A sequence that stops hands its computed tokens to the prefix cache with the state after its last computed
        token; a compressed cache is no prefix of anything, and a swapped one has no state here."""
        cache, n = self.kv.state_prefix, seq.num_computed_tokens
        if cache is not None and not seq.num_evicted and self.kv.has(seq.seq_id) and n:
            cache.keep(seq.seq_id, seq.token_ids[:n], min(n, seq.prompt_len))

    def take(self, request_id: str) -> list[StateCheckpoint]:
        """The request's checkpoints taken so far, now the caller's to release (``LLMEngine.release_checkpoint``)."""
        return self.taken.pop(request_id, [])

    def retire(self, req: Request) -> None:
        if req.start_from is not None:
            self.kv.release(req.start_from)
            req.start_from = None
