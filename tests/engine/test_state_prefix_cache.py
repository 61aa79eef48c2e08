"""A hybrid's prefix cache in the engine: the radix tree of kvtier.prefix holding state checkpoints. A hit resumes from a
state of exactly its length, so its logits must equal a cold prefill of the whole prompt (fp32, 1e-4), for both hybrid
families, whether the state was taken at a branch point inside an SSD chunk and a K/V block, after the last decoded
token, or (vLLM+) at a block boundary; the tree gives memory back before anyone is preempted; every block and slot
comes back when it lets go."""

from __future__ import annotations

import pytest
import torch

from kvtier import LLM, SamplingParams
from kvtier.errors import InvalidArgumentError
from kvtier.prefix.simulator import ALPHAS
from tests.engine.test_hf_parity import LogitSpy, prompts_of
from tests.hf_checkpoints import HYBRIDS, save_hf_checkpoint

TOL = 1e-4
GREEDY = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)


@pytest.fixture(scope="module", params=sorted(HYBRIDS))
def hybrid_dir(request, tmp_path_factory, tokenizer_files):
    return save_hf_checkpoint(tmp_path_factory.mktemp(request.param), tokenizer_files, request.param, **HYBRIDS[request.param])


@pytest.fixture(scope="module")
def cold(hybrid_dir):
    return LLM(str(hybrid_dir), kv_cache_memory=1 << 22, block_size=16, enable_prefix_caching=False)


def run(llm: LLM, prompt: list[int]) -> tuple[list[int], torch.Tensor, int]:
    """Greedy tokens, the logits of every step and the prompt tokens served from the cache, for one request."""
    spy = LogitSpy(llm)
    [out] = llm.generate([{"prompt_token_ids": prompt}], GREEDY, use_tqdm=False)
    [logits] = spy.by_seq.values()
    return list(out.outputs[0].token_ids), torch.stack(logits), out.num_cached_tokens


def emptied(llm: LLM) -> dict:
    """The engine's metrics once its prefix tree has given back everything it holds."""
    llm.engine.kv.state_prefix.tree.capacity = 0
    while llm.engine.kv.reclaim():
        pass
    return llm.get_metrics()


def same_as_cold(llm: LLM, cold: LLM, prompt: list[int]) -> int:
    tokens, logits, cached = run(llm, prompt)
    cold_tokens, cold_logits, cold_cached = run(cold, prompt)
    assert cold_cached == 0 and tokens == cold_tokens and (logits - cold_logits).abs().max().item() <= TOL
    return cached


@pytest.mark.parametrize("policy", ["marconi", "sglang+"])
def test_branch_and_last_token_checkpoints_serve_hits_equal_to_a_cold_prefill(hybrid_dir, cold, policy):
    """A second prompt sharing 45 tokens (inside the third 16-token SSD chunk and K/V block) splits the first's edge there,
    so the state at 45 is taken during its prefill; a third prompt resumes from it. A turn continuing the first prompt
    and its output resumes after the last computed token (the output's last token is sampled, never computed)."""
    llm = LLM(str(hybrid_dir), kv_cache_memory=1 << 22, block_size=16, prefix_cache_policy=policy)
    shared, a, b, c = prompts_of([45, 9, 12, 7], 512, seed=11)
    first, _, cached_a = run(llm, shared + a)
    assert cached_a == 0 and same_as_cold(llm, cold, shared + b) == 0, "the shared prefix has been seen once: no state yet"
    assert same_as_cold(llm, cold, shared + c) == 45
    follow = shared + a + first + [3, 4]
    assert same_as_cold(llm, cold, follow) == len(shared + a + first) - 1
    m = llm.get_metrics()
    assert m["prefix_cache_hits"] == 45 + len(shared + a + first) - 1 and m["prefix_cache_states"] >= 3
    assert m["kv_blocks_used"] == 0 and m["mamba_slots_used"] == 0 and m["mamba_slots_cached"] == m["prefix_cache_states"]


def test_vllm_plus_keeps_a_state_at_every_block_and_hits_the_last_whole_block(hybrid_dir, cold):
    llm = LLM(str(hybrid_dir), kv_cache_memory=1 << 22, block_size=16, prefix_cache_policy="vllm+")
    shared, a, c = prompts_of([45, 9, 7], 512, seed=12)
    out, _, _ = run(llm, shared + a)
    held = (len(shared + a + out) - 1) // 16  # the block boundaries of every computed token, prompt and output
    assert llm.get_metrics()["prefix_cache_states"] == held
    assert same_as_cold(llm, cold, shared + c) == 32


def test_the_tree_gives_memory_back_before_anyone_is_preempted(hybrid_dir, cold):
    """A cache of exactly four 96-token sequences (24 K/V blocks, 4 slots): served prompts fill it with checkpoints, then
    four requests that need every block and slot arrive; the tree's checkpoints go (evictions), nobody is preempted,
    the outputs are a cold engine's."""
    probe = LLM(str(hybrid_dir), kv_cache_memory=1 << 22, block_size=16, max_model_len=96).engine.memory_plan
    per_seq = sum(g.bytes_per_block * (6 if g.group.bytes_per_token else 1) for g in probe.groups)
    llm = LLM(str(hybrid_dir), kv_cache_memory=4 * per_seq + 64, block_size=16, max_model_len=96)
    assert [g.num_blocks for g in llm.engine.memory_plan.groups if g.group.bytes_per_token] == [24]
    for p in prompts_of([40, 50, 60, 70], 512, seed=13):
        run(llm, p)
    filled = llm.get_metrics()
    assert filled["prefix_cache_states"] > 0 and filled["kv_blocks_cached"] > 0
    big = prompts_of([80] * 4, 512, seed=14)
    outs = llm.generate([{"prompt_token_ids": p} for p in big], GREEDY, use_tqdm=False)
    expect = cold.generate([{"prompt_token_ids": p} for p in big], GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in expect]
    m = llm.get_metrics()
    assert m["prefix_cache_evictions"] > 0 and m["num_preemptions"] == 0, m
    m = emptied(llm)
    assert m["prefix_cache_states"] == 0 and m["kv_blocks_cached"] == 0 and m["mamba_slots_cached"] == 0
    assert m["kv_blocks_free"] == m["kv_blocks_total"], "every block and slot the tree held came back"


def test_alpha_is_tuned_on_the_requests_served(hybrid_dir):
    """Marconi's alpha, unset, starts at 0 and is tuned once the bootstrap window after the first eviction has passed (5x
    the requests served before it); with alpha given, it stays."""
    llm = LLM(str(hybrid_dir), kv_cache_memory=1 << 20, block_size=16)
    cache = llm.engine.kv.state_prefix
    cache.tree.capacity = 40 * cache.tree.costs.kv_bytes_per_token + 2 * cache.tree.costs.state_bytes  # a tree of a few entries
    served_at_first_eviction = None
    for i, p in enumerate(prompts_of([30] * 14, 512, seed=15)):
        run(llm, p)
        if served_at_first_eviction is None and cache.tree.evictions:
            served_at_first_eviction = i + 1
    assert served_at_first_eviction is not None and 6 * served_at_first_eviction <= 14
    assert cache.tunings and cache.tunings[0][0] == 6 * served_at_first_eviction and cache.tunings[0][1] in ALPHAS
    fixed = LLM(str(hybrid_dir), kv_cache_memory=1 << 20, prefix_cache_alpha=0.7)
    assert fixed.engine.kv.state_prefix.tree.policy.alpha == 0.7 and not fixed.engine.kv.state_prefix.tune


def test_bad_settings_are_refused_by_name(hybrid_dir):
    with pytest.raises(InvalidArgumentError, match="prefix_cache_policy: must be marconi, sglang\\+ or vllm\\+"):
        LLM(str(hybrid_dir), prefix_cache_policy="hash")
    with pytest.raises(InvalidArgumentError, match="prefix_cache_alpha: applies to the marconi policy only"):
        LLM(str(hybrid_dir), prefix_cache_policy="sglang+", prefix_cache_alpha=0.5)
    with pytest.raises(InvalidArgumentError, match="prefix_cache_policy: must be marconi, sglang\\+ or vllm\\+"):
        LLM(str(hybrid_dir), prefix_cache_policy="lru")
    with pytest.raises(InvalidArgumentError, match="prefix_cache_policy: must be one of lru, hash, vllm\\+, sglang\\+, marconi"):
        LLM(str(hybrid_dir), prefix_cache_policy="lfu")
    with pytest.raises(InvalidArgumentError, match="prefix_cache_alpha: must be a number in \\[0, 100\\]"):
        LLM(str(hybrid_dir), prefix_cache_alpha=-1)
    off = LLM(str(hybrid_dir), kv_cache_memory=1 << 22, enable_prefix_caching=False)
    shared = prompts_of([40], 512, seed=16)[0]
    for tail in ([1, 2], [3, 4], [5, 6]):
        run(off, shared + tail)
    assert off.get_metrics()["prefix_cache_hits"] == 0 and off.engine.kv.state_prefix is None


@pytest.mark.parametrize("policy,mode", [("vllm+", "recompute"), ("vllm+", "swap"), ("marconi", "recompute")])
def test_outputs_outgrowing_the_cache_preempt_and_every_request_finishes(hybrid_dir, cold, policy, mode):
    """Six requests whose outputs outgrow a cache of 16 K/V blocks and 4 state slots. The states taken for the tree
    during a prefill or decode are the tree's as soon as they are taken, so whatever they hold is given back before
    anyone is preempted, and a lone request is never judged too large while the tree holds its memory: every request
    ends with all its tokens, equal to a cold engine's, and nothing stays held once the tree lets go."""
    probe = LLM(str(hybrid_dir), kv_cache_memory=1 << 22, block_size=16, max_model_len=160).engine.memory_plan
    slot = sum(g.bytes_per_block for g in probe.groups if not g.group.bytes_per_token)
    block = sum(g.bytes_per_block for g in probe.groups if g.group.bytes_per_token)
    llm = LLM(str(hybrid_dir), kv_cache_memory=4 * slot + 16 * block + 64, mamba_full_memory_ratio=4 * slot / (16 * block), block_size=16,
              max_model_len=160, prefix_cache_policy=policy, preemption_mode=mode, swap_space=1 if mode == "swap" else 0)
    assert [g.num_blocks for g in llm.engine.memory_plan.groups] == [4, 16]
    params = SamplingParams(temperature=0.0, max_tokens=80, ignore_eos=True)
    prompts = [{"prompt_token_ids": p} for p in prompts_of([60, 70, 50, 65, 55, 75], 512, seed=17)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    expect = cold.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in expect]
    assert all(len(o.outputs[0].token_ids) == 80 for o in outs)
    m = llm.get_metrics()
    assert m["num_preemptions"] > 0 and m["prefix_cache_evictions"] > 0, m
    m = emptied(llm)
    assert m["kv_blocks_free"] == m["kv_blocks_total"] and m["mamba_slots_used"] == 0 and m["mamba_slots_cached"] == 0, m
