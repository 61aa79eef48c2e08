"""Sliding-window layers hold only their window: blocks the window has passed go back to the pool while a sequence
runs, so many more long sequences decode at once in the same memory, with HF's logits and exact prefix hits."""

from __future__ import annotations

import pytest
from sliding_window import peak_decoding, random_prompts  # benchmarks/sliding_window.py

from kvtier import LLM
from kvtier.engine.metrics import engine_metrics
from tests.engine.test_hf_parity import check_against_hf, prompts_of
from tests.hf_checkpoints import save_hf_checkpoint

WINDOW = 256
PROMPT_LEN = 4096
MAX_TOKENS = 96
BYTES_PER_TOKEN = 2 * 2 * 2 * 16 * 4  # K+V, layers, kv heads, head_dim, fp32 (tests.hf_checkpoints.TINY)


@pytest.fixture(scope="module")
def mistral_dirs(tmp_path_factory, tokenizer_files):
    """The same weights saved twice: with a 256-token window, and as full attention (``sliding_window`` None)."""
    return {window: save_hf_checkpoint(tmp_path_factory.mktemp(f"mistral-{window}"), tokenizer_files, "MistralForCausalLM",
                                       sliding_window=window, max_position_embeddings=8192)
            for window in (WINDOW, None)}


def test_a_window_of_256_decodes_five_times_the_sequences_in_the_same_memory(mistral_dirs):
    """The memory of four full-attention sequences of 4,096 + 96 tokens: full attention decodes at most four at once,
    the 256-token window at least twenty (each holds ~17 blocks, not 262)."""
    memory = 4 * (PROMPT_LEN + MAX_TOKENS) * BYTES_PER_TOKEN
    kw = dict(kv_cache_memory=memory, enable_prefix_caching=False, dtype="float32")
    full = peak_decoding(LLM(str(mistral_dirs[None]), **kw).engine, random_prompts(8, PROMPT_LEN, 512, seed=7), MAX_TOKENS)
    window = peak_decoding(LLM(str(mistral_dirs[WINDOW]), **kw).engine, random_prompts(30, PROMPT_LEN, 512, seed=7), MAX_TOKENS)
    assert full["blocks_left"] == window["blocks_left"] == 0, "every block is back once all finished"
    assert full["peak_decoding"] <= 4
    assert window["peak_decoding"] >= 5 * full["peak_decoding"], (window, full)
    assert window["peak_blocks"] <= full["peak_blocks"]


def test_window_logits_match_hf_through_chunks_and_prefix_hits(mistral_dirs):
    """1,000-token prompts prefilled in chunks of 192 (shorter than the window, so blocks leave mid-prefill): every
    logit within 1e-4 of HF's. A second round reuses a 700-token shared prefix whose early blocks the window has given
    back: the hit covers all its blocks, and the logits still match."""
    path = mistral_dirs[WINDOW]
    shared = prompts_of([700], 512, seed=8)[0]
    tails = prompts_of([300, 120], 512, seed=9)
    llm = check_against_hf(path, [shared + t for t in tails], max_tokens=6, max_num_batched_tokens=192, kv_cache_memory=1 << 24)
    assert engine_metrics(llm.engine, with_waste=False)["kv_blocks_used"] == 0
    before = llm.get_metrics()["prefix_cache_hits"]
    check_against_hf(path, [shared + t[::-1] for t in tails], max_tokens=6, llm=llm)
    assert llm.get_metrics()["prefix_cache_hits"] - before == 2 * (700 // 16) * 16


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_window_preemption_keeps_hf_logits(tmp_path, tokenizer_files, mode):
    """A 24-token window, 10 blocks of 16 for 6 sequences that each hold up to 3 at once: preemption must happen, in both
    modes, and the released blocks stay released through swap-out and swap-in."""
    path = save_hf_checkpoint(tmp_path, tokenizer_files, "MistralForCausalLM", sliding_window=24)
    llm = check_against_hf(path, prompts_of([30, 60, 45, 80, 20, 50], 512, seed=10), max_tokens=24, kv_cache_memory=10 * 16 * BYTES_PER_TOKEN,
                           preemption_mode=mode, swap_space=0.01, max_num_batched_tokens=32)
    assert llm.get_metrics()["num_preemptions"] > 0
    assert engine_metrics(llm.engine, with_waste=False)["kv_blocks_used"] == 0
