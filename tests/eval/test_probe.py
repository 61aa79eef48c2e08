"""The retrieval probe's decode protocol: feeding the question and the answer one cached step at a time
gives exactly the greedy tokens of full forwards without a cache, on both embedded architectures."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kvtier.eval.probe import greedy_after_decoded_question
from kvtier.training.circuit_init import residual_outputs, seed_circuit
from kvtier.training.recipes import KVTIER_TINY, KVTIER_TINY_HYBRID
from kvtier.training.trainer import build_model


@torch.inference_mode()
def _greedy_without_cache(model: torch.nn.Module, ids: list[int], new_tokens: int) -> list[int]:
    ids = list(ids)
    for _ in range(new_tokens):
        ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[-new_tokens:]


@pytest.mark.parametrize("recipe", [KVTIER_TINY, KVTIER_TINY_HYBRID], ids=lambda r: r.name)
def test_decoded_question_matches_full_forwards(recipe):
    """Bamba numbers a cached step's token from 0 unless told its position: the probe must tell it."""
    shrink = {"num_hidden_layers": 4, "max_position_embeddings": 256}
    if "attn_layer_indices" in recipe.config:
        shrink["attn_layer_indices"] = [1, 3]
    small = dataclasses.replace(recipe, config={**recipe.config, **shrink})
    model = build_model(small, seed=0)
    seed_circuit(model, small.circuit, seed=0)  # attention that depends on position: offset and induction heads
    with torch.no_grad():
        for proj in residual_outputs(model):  # and every branch live, the Mamba2 mixers' state included
            proj.weight.add_(0.02 * torch.randn(proj.weight.shape, generator=torch.Generator().manual_seed(1)))
    model.eval()
    context = torch.randint(3, 8192, (60,), generator=torch.Generator().manual_seed(0)).tolist()
    question = context[20:25]  # a repeat: the induction heads copy what followed it, if positions are right
    assert greedy_after_decoded_question(model, context, question, 6) == _greedy_without_cache(model, context + question, 6)


def test_the_engine_probe_answers_as_transformers_does_on_the_shipped_model():
    """kvtier's engine (haystack prefilled in chunks of 256, question forced through decode) and transformers (question
    fed through decode steps), fp32 both, get the same samples of the shipped kvtier-tiny right and wrong, one by one."""
    from tokenizers import Tokenizer as HFTokenizer
    from transformers import AutoModelForCausalLM

    from kvtier import LLM
    from kvtier.eval.probe import engine_replies, probe_replies, run_engine_probe
    from kvtier.models.embedded import resolve_model
    from kvtier.training.data import TokenIds

    folder = resolve_model("kvtier-tiny")
    tok = HFTokenizer.from_file(f"{folder}/tokenizer.json")
    ids = TokenIds(tok)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    llm = LLM(folder, dtype="float32", max_num_batched_tokens=256, kv_cache_memory=1 << 26)
    for task in ("passkey", "multikey"):
        theirs = [s.is_correct(r) for s, r in probe_replies(hf, ids, tok.decode, task, 700, 6, seed=5)]
        mine = [s.is_correct(r) for s, r in engine_replies(llm, ids, task, 700, 6, seed=5)]
        assert mine == theirs, task
    assert run_engine_probe(llm, ids, "passkey", 700, 6, seed=5).accuracy >= 0.8
