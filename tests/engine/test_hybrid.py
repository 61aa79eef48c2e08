"""Hybrids (attention + Mamba2: Bamba and NemotronH) through the engine against HF transformers on the same random weights: logits at
every generated position, mixed-length batches, chunked prefill that splits SSD chunks, preemption by recompute and
by swap, forks (n > 1, beam search) that share a state slot until one of them writes, and the prefix-caching rule."""

from __future__ import annotations

import pytest
import torch
import transformers

from kvtier import LLM, BeamSearchParams, SamplingParams
from tests.engine.test_hf_parity import check_against_hf, prompts_of
from tests.hf_checkpoints import BAMBA, HYBRIDS, save_hf_checkpoint


@pytest.fixture(scope="module", params=sorted(HYBRIDS))
def hybrid_dir(request, tmp_path_factory, tokenizer_files):
    """Each family's checkpoint: both have Mamba2 at layer 0 and one attention layer of the same shape, so the state
    slot and the KV block weigh the same."""
    return save_hf_checkpoint(tmp_path_factory.mktemp(request.param), tokenizer_files, request.param, **HYBRIDS[request.param])


@pytest.mark.parametrize("rotary", [1.0, 0.5])
def test_mixed_lengths_match_hf_with_full_and_partial_rotary(tmp_path, tokenizer_files, rotary):
    rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": rotary}
    path = save_hf_checkpoint(tmp_path, tokenizer_files, "BambaForCausalLM", **BAMBA, rope_parameters=rope)
    check_against_hf(path, prompts_of([5, 17, 33, 1, 64, 40], 512), kv_cache_memory=1 << 22)


def test_mixed_lengths_match_hf(hybrid_dir):
    check_against_hf(hybrid_dir, prompts_of([5, 17, 33, 1, 64, 40], 512), kv_cache_memory=1 << 22)


@pytest.mark.parametrize("budget", [24, 7, 2048])
def test_chunked_prefill_splitting_ssd_chunks_matches_hf(hybrid_dir, budget):
    check_against_hf(hybrid_dir, prompts_of([70, 9, 45, 130], 512, seed=2), max_num_batched_tokens=budget, kv_cache_memory=1 << 22)


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_preemption_keeps_outputs_exact(hybrid_dir, mode):
    """3 state slots (one kept free while others run) and 7 blocks of 16 tokens for 6 sequences that grow to ~4 blocks each (SGLang's
    mamba_full_memory_ratio sets the split): requests wait for slots, running ones are preempted for blocks."""
    slot, block = 3 * (192 * 3 + 4 * 32 * 16) * 4, 16 * 2 * 2 * 16 * 4  # 3 Mamba2 layers' conv + SSM state; K+V of 1 layer, fp32
    llm = LLM(str(hybrid_dir), kv_cache_memory=int(1.01 * (3 * slot + 7 * block)), mamba_full_memory_ratio=3 * slot / (7 * block), preemption_mode=mode,
              swap_space=0.01)
    plan = llm.engine.memory_plan
    assert [(g.group.spec.label, g.num_blocks, g.bytes_per_block) for g in plan.groups] == [("mamba2 state", 3, slot), ("full attention", 7, block)]
    check_against_hf(hybrid_dir, prompts_of([30, 40, 35, 45, 20, 38], 512, seed=3), max_tokens=24, llm=llm)
    m = llm.get_metrics()
    assert m["num_preemptions"] > 0, m
    assert m["kv_blocks_used"] == 0 and m["kv_host_blocks_used"] == 0, "every slot and block came back"


def test_parallel_samples_fork_the_state(hybrid_dir):
    """n = 3 greedy samples share the prompt's state slot, then each writes its own copy: all three are HF's greedy."""
    llm = LLM(str(hybrid_dir), kv_cache_memory=1 << 22)
    prompt = prompts_of([21], 512, seed=4)[0]
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(n=3, temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)[0]
    hf = transformers.AutoModelForCausalLM.from_pretrained(hybrid_dir, dtype=torch.float32).eval()
    ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long), max_new_tokens=10, min_new_tokens=10,
                      do_sample=False, pad_token_id=2)[0, len(prompt):].tolist()
    assert [o.token_ids for o in out.outputs] == [ref] * 3
    assert llm.get_metrics()["kv_blocks_used"] == 0


def test_cache_bytes_used_counts_blocks_and_slots(hybrid_dir):
    """After a 21-token prefill: two 16-token K/V blocks and one state slot, by the plan's bytes per block and per slot."""
    llm = LLM(str(hybrid_dir), kv_cache_memory=1 << 22)
    llm.engine.add_request({"prompt_token_ids": prompts_of([21], 512, seed=6)[0]}, SamplingParams(max_tokens=4), "r")
    llm.engine.step()
    size = {g.group.spec.label: g.bytes_per_block for g in llm.engine.memory_plan.groups}
    assert llm.get_metrics()["cache_bytes_used"] == 2 * size["full attention"] + size["mamba2 state"]
    while llm.engine.has_unfinished_requests():
        llm.engine.step()
    assert llm.get_metrics()["cache_bytes_used"] == 0


def test_beam_search_matches_hf(hybrid_dir):
    llm = LLM(str(hybrid_dir), kv_cache_memory=1 << 22)
    prompt, width, steps = prompts_of([11], 512, seed=5)[0], 4, 6
    out = llm.beam_search({"prompt_token_ids": prompt}, BeamSearchParams(beam_width=width, max_tokens=steps, ignore_eos=True))[0]
    hf = transformers.AutoModelForCausalLM.from_pretrained(hybrid_dir, dtype=torch.float32).eval()
    gen = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long), num_beams=width,
                      num_return_sequences=width, do_sample=False, max_new_tokens=steps, min_new_tokens=steps, early_stopping=False,
                      length_penalty=1.0, pad_token_id=2)
    assert [o.token_ids for o in out.outputs] == [row[len(prompt):].tolist() for row in gen]


def test_a_shared_prefix_is_served_from_the_state_prefix_cache_and_matches_hf(hybrid_dir):
    """On by default (Marconi's tree, tests/engine/test_state_prefix_cache.py): the second prompt's prefill keeps the state
    where it leaves the first, and the third resumes from it; every output is transformers' own."""
    llm = LLM(str(hybrid_dir), kv_cache_memory=1 << 22)
    shared = prompts_of([48], 512, seed=6)[0]
    for tail in ([7, 8], [9, 10], [11, 12]):
        check_against_hf(hybrid_dir, [shared + tail], llm=llm)
    assert llm.get_metrics()["prefix_cache_hits"] == 48


def test_state_dtypes_follow_vllms_flags(hybrid_dir):
    llm = LLM(str(hybrid_dir), kv_cache_memory=1 << 22, mamba_cache_dtype="bfloat16", mamba_ssm_cache_dtype="float32")
    spec = llm.engine.memory_plan.groups[0].group.spec
    assert (spec.conv_dtype, spec.ssm_dtype) == (torch.bfloat16, torch.float32)
    conv, ssm = llm.engine.storage.groups[0].device
    assert (conv.dtype, ssm.dtype) == (torch.bfloat16, torch.float32)
