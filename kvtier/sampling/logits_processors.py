"""Logits processors that ship with kvtier (``SamplingParams(logits_processors=[...])``, vLLM's per-request hook)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvtier.errors import InvalidArgumentError


class ForcedTokens:
    """Make a request's first outputs exactly ``token_ids``, then leave its logits alone.

    Under greedy sampling this feeds a known text (a retrieval question, an answer being scored)
    through decode steps, one token each, so a KV-cache method that acts after prefill sees it as
    it sees generated text; ``logprobs`` still report the model's own probability of each token.
    """

    def __init__(self, token_ids: Sequence[int]) -> None:
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in token_ids):
            raise InvalidArgumentError("token_ids", f"must be integer token ids >= 0, got {list(token_ids)!r:.80}")
        self.token_ids = list(token_ids)

    def __call__(self, output_token_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        step = len(output_token_ids)
        if step >= len(self.token_ids):
            return logits
        token = self.token_ids[step]
        if token >= logits.shape[-1]:
            raise InvalidArgumentError("token_ids", f"must be below the vocabulary size {logits.shape[-1]}, got {token}")
        forced = torch.full_like(logits, float("-inf"))
        forced[token] = 0.0
        return forced


class RecordLogits:
    """Keep each step's logits as they reach this processor (put it first: the model's own), leaving them unchanged:
    what a measure comparing next-token distributions reads, such as a KV method's KL from the full cache."""

    def __init__(self) -> None:
        self.logits: list[torch.Tensor] = []

    def __call__(self, output_token_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        self.logits.append(logits.detach().float().clone())
        return logits
