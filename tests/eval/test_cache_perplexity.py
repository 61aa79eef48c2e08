"""Perplexity through the engine's cache: the next tokens of real held-out text after each window, scored as a plain
transformers forward over window and continuation scores them."""

from __future__ import annotations

import math

import torch

from kvtier import LLM
from kvtier.eval.agreement import text_windows
from kvtier.eval.haystacks import source_texts
from kvtier.eval.perplexity import PERPLEXITY_TOKENS, cache_perplexity


def test_the_windows_and_their_continuations_are_runs_of_the_held_out_text(llama_dir):
    """What perplexity scores is the text that really follows each window; agreement's windows (after=0) are as before."""
    llm = LLM(str(llama_dir), dtype="float32", kv_cache_memory=1 << 22)
    tok = llm.get_tokenizer()
    ids = ",".join(map(str, tok.encode(" ".join(source_texts("heldout")), add_special_tokens=False))) + ","
    bos = tok.encode("", add_special_tokens=True)
    windows = text_windows(llm, 100, 4, seed=2, after=PERPLEXITY_TOKENS)
    assert all(len(w) == 100 + PERPLEXITY_TOKENS and w[:len(bos)] == bos for w in windows)
    assert all(",".join(map(str, w[len(bos):])) + "," in ids for w in windows)
    assert [len(w) for w in text_windows(llm, 100, 4, seed=2)] == [100] * 4


def test_full_cache_perplexity_equals_a_plain_transformers_forward(llama_dir):
    """fp32 both: the engine (window prefilled in chunks, the true continuation forced through decode steps) and one
    transformers forward over window + continuation give the same NLL at each scored position."""
    from transformers import AutoModelForCausalLM

    context, trials, seed = 150, 3, 4
    llm = LLM(str(llama_dir), dtype="float32", kv_cache_memory=1 << 22, max_num_batched_tokens=64)
    ppl, top1 = cache_perplexity(llm, context, trials, seed)
    hf = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    nll, hits = [], []
    with torch.inference_mode():
        for w in text_windows(llm, context, trials, seed, after=PERPLEXITY_TOKENS):
            x = torch.tensor([w])
            logits = hf(input_ids=x).logits[0, context - 1:-1]
            truth = x[0, context:]
            nll.append(torch.nn.functional.cross_entropy(logits, truth, reduction="none"))
            hits.append(logits.argmax(-1) == truth)
    want = math.exp(torch.cat(nll).mean().item())
    assert 1.0 < want and abs(ppl - want) <= 1e-4 * want, (ppl, want)
    assert abs(top1 - torch.cat(hits).float().mean().item()) <= 1 / (trials * PERPLEXITY_TOKENS)  # a near-tie may flip
