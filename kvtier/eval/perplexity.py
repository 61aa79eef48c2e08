"""Perplexity of a causal LM: a transformers model over a token stream in non-overlapping windows, or kvtier's engine
on the text that follows windows of held-out text, read through its (possibly compressed) cache."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch

from kvtier.eval.agreement import continue_greedily, text_windows

if TYPE_CHECKING:
    from kvtier.entrypoints.llm import LLM

PERPLEXITY = "perplexity"
PERPLEXITY_TOKENS = 64  # the true tokens scored after each window


@torch.inference_mode()
def perplexity(model: torch.nn.Module, ids: np.ndarray, window: int, max_tokens: int | None = None) -> float:
    """exp(mean next-token NLL) over ``ids[:max_tokens]`` cut into windows of ``window`` tokens."""
    ids = ids[:max_tokens] if max_tokens else ids
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = torch.as_tensor(ids[start:start + window], dtype=torch.long)[None]
        if chunk.shape[1] < 2:
            break
        logits = model(input_ids=chunk).logits.float()
        nll += float(torch.nn.functional.cross_entropy(logits[0, :-1], chunk[0, 1:], reduction="sum"))
        count += chunk.shape[1] - 1
    return math.exp(nll / count)


def cache_perplexity(llm: LLM, context_tokens: int, trials: int, seed: int) -> tuple[float, float]:
    """exp(mean NLL) of the :data:`PERPLEXITY_TOKENS` true tokens after each of ``trials`` windows of held-out text
    (:func:`~kvtier.eval.agreement.text_windows`), and how often the true token was the top-1. Each window is prefilled,
    so a KV method compresses it, and its true continuation is forced through decode steps: each token is scored
    against what the method kept, as generated text would be."""
    windows = text_windows(llm, context_tokens, trials, seed, after=PERPLEXITY_TOKENS)
    truth = [w[context_tokens:] for w in windows]
    got = continue_greedily(llm, [w[:context_tokens] for w in windows], PERPLEXITY_TOKENS, forced=truth)
    logits = torch.cat([scores for _, scores in got])
    target = torch.tensor([t for tokens in truth for t in tokens])
    nll = torch.nn.functional.cross_entropy(logits, target).item()
    return math.exp(nll), (logits.argmax(-1) == target).float().mean().item()
