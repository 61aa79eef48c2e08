"""The radix tree as an attention-only model's prefix cache (its default, ``lru``: vLLM+'s rules with no state to hold).
Hits served from the tree's checkpoints give HF's logits (fp32, 1e-4); tokens are compared exactly; the blocks of every
boundary a chunk passed are kept without stopping the prefill; the tree gives memory back before anyone is preempted
and every block comes back when it lets go; the block-hash cache stays selectable. (Sliding-window models are checked
against HF with the tree in tests/engine/test_sliding_window.py.)"""

from __future__ import annotations

import pytest

from kvtier import LLM, SamplingParams
from kvtier.errors import InvalidArgumentError
from tests.engine.test_hf_parity import check_against_hf, prompts_of
from tests.engine.test_state_prefix_cache import emptied

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def test_hits_on_whole_blocks_of_a_shared_prefix_and_of_a_finished_turn_give_hf_logits(llama_dir):
    """A 54-token prompt and 8 outputs compute 61 tokens: the tree keeps the blocks at 16, 32 and 48. A prompt sharing
    45 tokens resumes after 32; the next turn of the first (its prompt, outputs and two more tokens) after 48."""
    llm = LLM(str(llama_dir), kv_cache_memory=1 << 22, block_size=16, dtype="float32")
    assert llm.engine.prefix_cache_policy == "lru"
    shared, a, b = prompts_of([45, 9, 12], 512, seed=21)
    [first] = llm.generate([{"prompt_token_ids": shared + a}], GREEDY, use_tqdm=False)
    assert llm.get_metrics()["prefix_cache_states"] == 3
    check_against_hf(llama_dir, [shared + b], llm=llm)
    assert llm.get_metrics()["prefix_cache_hits"] == 32
    check_against_hf(llama_dir, [shared + a + list(first.outputs[0].token_ids) + [3, 4]], llm=llm)
    assert llm.get_metrics()["prefix_cache_hits"] == 32 + 48


def test_the_prefill_never_stops_for_the_tree(llama_dir):
    """A 200-token prompt is prefilled in one step (12 block boundaries kept after it), unlike a hybrid's vLLM+."""
    llm = LLM(str(llama_dir), kv_cache_memory=1 << 22, block_size=16)
    steps = 0
    inner = llm.engine.runner.execute

    def execute(*args, **kwargs):
        nonlocal steps
        steps += 1
        return inner(*args, **kwargs)

    llm.engine.runner.execute = execute
    llm.generate([{"prompt_token_ids": prompts_of([200], 512, seed=22)[0]}], SamplingParams(max_tokens=1), use_tqdm=False)
    assert steps == 1 and llm.get_metrics()["prefix_cache_states"] == 200 // 16


def test_the_tree_gives_memory_back_before_anyone_is_preempted(llama_dir):
    """A cache of exactly four 96-token sequences: served prompts fill it with checkpoints, then four requests that need
    every block arrive; the tree's entries go, nobody is preempted, the outputs are a cold engine's, and every block
    comes back when the tree lets go."""
    probe = LLM(str(llama_dir), kv_cache_memory=1 << 22, block_size=16, max_model_len=96).engine.memory_plan
    llm = LLM(str(llama_dir), kv_cache_memory=4 * 6 * probe.groups[0].bytes_per_block + 64, block_size=16, max_model_len=96)
    cold = LLM(str(llama_dir), kv_cache_memory=1 << 22, block_size=16, enable_prefix_caching=False)
    assert llm.engine.memory_plan.groups[0].num_blocks == 24
    for p in prompts_of([40, 50, 60, 70], 512, seed=23):
        llm.generate([{"prompt_token_ids": p}], GREEDY, use_tqdm=False)
    assert llm.get_metrics()["kv_blocks_cached"] > 0
    big = [{"prompt_token_ids": p} for p in prompts_of([80] * 4, 512, seed=24)]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    outs, expect = llm.generate(big, params, use_tqdm=False), cold.generate(big, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in expect]
    m = llm.get_metrics()
    assert m["prefix_cache_evictions"] > 0 and m["num_preemptions"] == 0, m
    m = emptied(llm)
    assert m["prefix_cache_states"] == 0 and m["kv_blocks_cached"] == 0 and m["kv_blocks_free"] == m["kv_blocks_total"], m


def test_the_block_hash_cache_stays_selectable_and_hybrid_policies_are_refused(llama_dir):
    llm = LLM(str(llama_dir), kv_cache_memory=1 << 22, block_size=16, prefix_cache_policy="hash")
    assert llm.engine.kv.state_prefix is None and llm.engine.prefix_cache_policy == "hash"
    shared, a, b = prompts_of([40, 3, 5], 512, seed=25)
    for p in (shared + a, shared + b):
        llm.generate([{"prompt_token_ids": p}], GREEDY, use_tqdm=False)
    assert llm.get_metrics()["prefix_cache_hits"] == 32
    with pytest.raises(InvalidArgumentError, match="prefix_cache_policy: must be lru or hash"):
        LLM(str(llama_dir), prefix_cache_policy="marconi")
