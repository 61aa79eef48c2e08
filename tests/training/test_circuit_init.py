"""The structured initialisation: layer 0's offset heads attend where they claim, and the seeded model copies.

The induction probe is the independent check: it knows nothing of how the weights were laid out, only
whether the second copy of random-token segments is predicted.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kvtier.eval.probe import induction_accuracy
from kvtier.training.circuit_init import seed_circuit, seed_previous_token_heads
from kvtier.training.recipes import KVTIER_TINY
from kvtier.training.trainer import build_model

RECIPE = dataclasses.replace(KVTIER_TINY, config={**KVTIER_TINY.config, "max_position_embeddings": 1024})


def _seeded(induction: bool) -> torch.nn.Module:
    model = build_model(RECIPE, seed=0)
    if induction:
        seed_circuit(model, RECIPE.circuit, seed=0)
    else:
        seed_previous_token_heads(model, seed=0)
    return model.eval()


@torch.no_grad()
def test_offset_heads_attend_one_and_two_tokens_back():
    model = _seeded(induction=False)
    model.config._attn_implementation = "eager"
    x = torch.randint(3, RECIPE.config["vocab_size"], (1, 1024), generator=torch.Generator().manual_seed(0))
    attn = model(input_ids=x, output_attentions=True).attentions[0][0]  # (heads, query, key)
    for head, offset in [(0, 1), (1, 2), (2, 1), (3, 2)]:
        rows = torch.arange(offset, 1024)
        assert torch.equal(attn[head, rows].argmax(-1), rows - offset), f"head {head}"
        assert attn[head, rows, rows - offset].mean() > 0.95


@torch.no_grad()
def test_seeded_model_copies_random_segments_and_a_plain_one_does_not():
    vocab = RECIPE.config["vocab_size"]
    assert induction_accuracy(_seeded(induction=True), vocab, segment=64, rows=8) > 0.9
    assert induction_accuracy(_seeded(induction=False), vocab, segment=64, rows=8) < 0.05
    assert induction_accuracy(build_model(RECIPE, seed=0).eval(), vocab, segment=64, rows=8) < 0.05


def test_offsets_must_match_the_query_heads_per_group():
    with pytest.raises(ValueError, match="offsets"):
        seed_previous_token_heads(build_model(RECIPE, seed=0), offsets=(1, 2, 3))
