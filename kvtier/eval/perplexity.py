"""Perplexity of a transformers causal LM over a token stream, in non-overlapping windows."""

from __future__ import annotations

import math

import numpy as np
import torch


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
