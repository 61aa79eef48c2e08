"""The shipped logits processors, against hand-worked cases."""

from __future__ import annotations

import pytest
import torch

from kvtier.errors import InvalidArgumentError
from kvtier.sampling.logits_processors import ForcedTokens


def test_forced_tokens_leave_one_choice_then_step_aside():
    force = ForcedTokens([3, 0, 5])
    logits = torch.arange(8, dtype=torch.float32)
    for step, token in enumerate([3, 0, 5]):
        out = force(list(range(step)), logits)
        assert out.argmax().item() == token and torch.isinf(out).sum().item() == 7
    assert force([7, 7, 7], logits) is logits and force([7] * 9, logits) is logits


def test_forced_tokens_name_bad_ids():
    with pytest.raises(InvalidArgumentError, match="token_ids: must be integer token ids >= 0"):
        ForcedTokens([1, -2])
    with pytest.raises(InvalidArgumentError, match="token_ids: must be below the vocabulary size 8, got 9"):
        ForcedTokens([9])([], torch.zeros(8))
