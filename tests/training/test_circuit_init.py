"""The structured initialisation: the offset heads attend where they claim, and the seeded models copy.

The induction probe is the independent check: it knows nothing of how the weights were laid out, only
whether the second copy of random-token segments is predicted.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kvtier.eval.probe import induction_accuracy
from kvtier.training.circuit_init import OFFSETS, seed_circuit, seed_previous_token_heads
from kvtier.training.recipes import KVTIER_TINY, KVTIER_TINY_HYBRID
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
def test_offset_heads_attend_their_offset_back():
    model = _seeded(induction=False)
    model.config._attn_implementation = "eager"
    x = torch.randint(3, RECIPE.config["vocab_size"], (1, 1024), generator=torch.Generator().manual_seed(0))
    attn = model(input_ids=x, output_attentions=True).attentions[0][0]  # (heads, query, key)
    for head, offset in enumerate(OFFSETS):
        rows = torch.arange(offset, 1024)
        assert torch.equal(attn[head, rows].argmax(-1), rows - offset), f"head {head}"
        assert attn[head, rows, rows - offset].mean() > 0.95


@torch.no_grad()
def test_seeded_model_copies_random_segments_and_a_plain_one_does_not():
    vocab = RECIPE.config["vocab_size"]
    assert induction_accuracy(_seeded(induction=True), vocab, segment=64, rows=8) > 0.9
    assert induction_accuracy(_seeded(induction=False), vocab, segment=64, rows=8) < 0.05
    assert induction_accuracy(build_model(RECIPE, seed=0).eval(), vocab, segment=64, rows=8) < 0.05


@pytest.mark.parametrize("offsets", [(1, 2, 3), (1, 2, 3, 4, 5, 6)])
def test_offsets_must_fill_whole_kv_groups_and_fit_the_residual(offsets):
    with pytest.raises(ValueError, match="offsets"):
        seed_previous_token_heads(build_model(RECIPE, seed=0), offsets=offsets)


@torch.no_grad()
def test_matching_heads_prefer_the_longest_earlier_match():
    """``A B C X`` and ``D B C Y`` both precede a final ``A B C``: only a three-token key can tell X from Y."""
    vocab, rows, n = RECIPE.config["vocab_size"], 32, 256
    g = torch.Generator().manual_seed(1)
    x = torch.randint(3, vocab, (rows, n), generator=g)
    a, b, c, d, want, other = torch.randint(3, vocab, (6, rows), generator=g)
    for r in range(rows):
        first, second = sorted(torch.randperm(n - 20, generator=g)[:2].tolist())
        second = max(second, first + 5)
        near, far = ((a, want), (d, other)) if r % 2 else ((d, other), (a, want))  # the true match first or second
        x[r, first:first + 4] = torch.stack([far[0][r], b[r], c[r], far[1][r]])
        x[r, second:second + 4] = torch.stack([near[0][r], b[r], c[r], near[1][r]])
        x[r, -3:] = torch.stack([a[r], b[r], c[r]])

    def hits(key_tokens: int) -> float:
        model = build_model(RECIPE, seed=0)
        seed_circuit(model, dataclasses.replace(RECIPE.circuit, key_tokens=key_tokens), seed=0)
        return (model.eval()(input_ids=x).logits[:, -1].argmax(-1) == want).float().mean().item()

    assert hits(3) > 0.9
    assert hits(1) < 0.75  # one token of key: X and Y tie, so about half


@pytest.mark.parametrize("key_tokens", [0, len(OFFSETS) + 1])
def test_key_tokens_must_be_covered_by_the_offset_heads(key_tokens):
    with pytest.raises(ValueError, match="key_tokens"):
        seed_circuit(build_model(RECIPE, seed=0), dataclasses.replace(RECIPE.circuit, key_tokens=key_tokens), seed=0)


@torch.no_grad()
def test_the_hybrid_carries_the_circuit_in_its_attention_layers():
    """Bamba's attention layers sit among Mamba2 layers; the zero-init mixers leave the circuit intact."""
    hybrid = dataclasses.replace(KVTIER_TINY_HYBRID, config={**KVTIER_TINY_HYBRID.config, "max_position_embeddings": 1024})
    model = build_model(hybrid, seed=0)
    seed_circuit(model, hybrid.circuit, seed=0)
    assert induction_accuracy(model.eval(), hybrid.config["vocab_size"], segment=64, rows=8) > 0.9
