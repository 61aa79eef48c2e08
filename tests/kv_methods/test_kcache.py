"""KCache through the engine: exact when N covers the context (MHA and GQA), the Top-N a float64 reimplementation driving
transformers on the same weights chooses when it does not, V in a separately budgeted host tier (the device pool holding
K only), the tier's blocks shared, copied and swapped with K's, and bad configuration refused at start by name."""

from __future__ import annotations

import math

import pytest
import torch

from kvtier import LLM, SamplingParams
from kvtier.errors import InvalidArgumentError, OutOfKVCacheError
from kvtier.kv_methods.kcache import KCacheConfig
from tests.engine.test_hf_parity import LogitSpy, prompts_of
from tests.hf_checkpoints import save_hf_checkpoint
from tests.kv_methods.test_decode_methods import attention_reference

TOL = 1e-4
BLOCK = 16  # the engine's default block size: KCache's residual works block by block


@pytest.fixture(scope="module", params=["gqa", "mha"])
def model_dir(request, tmp_path_factory, tokenizer_files):
    """A random Llama of 2 layers and 4 heads, fp32, built by transformers: 2 KV heads (GQA) or 4 (MHA)."""
    kv_heads = 2 if request.param == "gqa" else 4
    return save_hf_checkpoint(tmp_path_factory.mktemp(request.param), tokenizer_files, "LlamaForCausalLM", num_key_value_heads=kv_heads)


def greedy(path, prompt, max_tokens, **engine_kw):
    llm = LLM(str(path), dtype="float32", kv_cache_memory=1 << 22, **engine_kw)
    spy = LogitSpy(llm)
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True), use_tqdm=False)[0]
    (logits,) = spy.by_seq.values()
    return out.outputs[0].token_ids, torch.stack(logits)


@pytest.mark.parametrize("config", [{"top_n": 512}, {"top_n": 1.0, "renormalize": False, "per_kv_head": True, "dense_layers": 1}])
def test_n_covering_the_context_gives_the_full_cache(model_dir, config):
    """256 greedy steps after a 100-token prompt: the same tokens, every logit within 1e-5 of the full cache's."""
    prompt = prompts_of([100], 512, seed=31)[0]
    full_tokens, full = greedy(model_dir, prompt, 256)
    tokens, mine = greedy(model_dir, prompt, 256, kv_method="kcache", kv_method_config=config)
    assert tokens == full_tokens
    assert (mine - full).abs().max().item() <= 1e-5


def kcache_attention(config: KCacheConfig):
    """An eager attention for transformers that decodes as KCache does, in float64: every key scored, the softmax over all,
    the N best probabilities of each query head (of each KV head: the highest over its query heads) kept and, with
    ``renormalize``, rescaled to sum to 1, or with ``residual`` the mass of the others spread evenly over the tokens of
    their block of 16 (which is what weighting the block's mean value by it gives); the first ``dense_layers`` layers and
    the prompt attend to everything."""

    def attend(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        _, heads, q_len, _ = query.shape
        kv_heads, n = key.shape[1], key.shape[2]
        group = heads // kv_heads
        k, v = key[0].repeat_interleave(group, 0), value[0].repeat_interleave(group, 0)  # [heads, n, D]
        visible = torch.arange(n)[None, :] <= torch.arange(n - q_len, n)[:, None]
        probs = (query[0] @ k.transpose(1, 2) * scaling).masked_fill(~visible, -math.inf).softmax(-1)  # [heads, q_len, n]
        kept = config.kept(n)
        if q_len == 1 and module.layer_idx >= config.dense_layers and kept < n:
            p = probs[:, 0]  # [heads, n]
            score = p.view(kv_heads, group, n).amax(1).repeat_interleave(group, 0) if config.per_kv_head else p
            mask = torch.zeros_like(p, dtype=torch.bool).scatter_(1, score.topk(kept, -1).indices, True)
            read = p.masked_fill(~mask, 0.0)
            if config.residual:
                block = torch.arange(n) // BLOCK
                missing = torch.zeros(heads, int(block[-1]) + 1, dtype=p.dtype).index_add_(1, block, p - read)
                read = read + missing[:, block] / torch.bincount(block)[block]
            probs = (read / read.sum(-1, keepdim=True) if config.renormalize else read)[:, None]
        return (probs @ v).transpose(0, 1)[None], probs[None]

    return attend


@pytest.mark.parametrize("config", [{"top_n": 16}, {"top_n": 0.1, "renormalize": False}, {"top_n": 24, "per_kv_head": True},
                                    {"budget": 8, "dense_layers": 1}, {"top_n": 16, "residual": True},
                                    {"top_n": 8, "per_kv_head": True, "residual": True}])
def test_top_n_reads_what_a_float64_reference_reads(model_dir, config):
    """Logits along the engine's greedy path equal the reference's (1e-4), and differ from the full cache's: N < context."""
    prompt = prompts_of([150], 512, seed=32)[0]
    tokens, mine = greedy(model_dir, prompt, 24, kv_method="kcache", kv_method_config=config)
    expect = attention_reference(model_dir, prompt, tokens, "kcache_reference", kcache_attention(KCacheConfig(**config)))
    assert (mine - expect).abs().max().item() <= TOL
    _, full = greedy(model_dir, prompt, 24)
    assert (full[1:] - mine[1:]).abs().max().item() > 1e-3, "Top-N changed nothing: the test could not fail"


def test_the_device_pool_holds_k_and_the_host_tier_v(model_dir):
    """By the engine's accounting a token takes half the device bytes (K only; <= 55% is the issue's bar), so the same
    device budget holds twice the blocks; V sits in a tensor of its own with the host tier's budget, which can bound the
    block count; dense layers keep V on the device."""
    full = LLM(str(model_dir), dtype="float32", kv_cache_memory=1 << 20).engine.memory_plan
    plan = LLM(str(model_dir), dtype="float32", kv_cache_memory=1 << 20, kv_method="kcache").engine.memory_plan
    assert plan.bytes_per_token / full.bytes_per_token <= 0.55
    assert plan.bytes_per_token * 2 == full.bytes_per_token == plan.tier_bytes_per_token * 2
    assert plan.groups[0].num_blocks == 2 * full.groups[0].num_blocks
    engine = LLM(str(model_dir), dtype="float32", kv_cache_memory=1 << 20, kv_host_memory=1 << 18, kv_method="kcache").engine
    (g,) = engine.memory_plan.groups
    assert g.num_blocks == (1 << 18) // g.group.tier_bytes_per_block < plan.groups[0].num_blocks
    storage = engine.storage.groups[0]
    assert storage.k.home.shape == storage.v.home.shape and storage.k.home.data_ptr() != storage.v.home.data_ptr()
    assert storage.v.home.shape[2] == g.num_blocks * engine.memory_plan.block_size
    mixed = LLM(str(model_dir), dtype="float32", kv_cache_memory=1 << 20, kv_method="kcache", kv_method_config={"dense_layers": 1}).engine.memory_plan
    assert [g.group.layers for g in mixed.groups] == [(0,), (1,)]
    assert mixed.bytes_per_token * 4 == full.bytes_per_token * 3 and mixed.tier_bytes_per_token * 4 == full.bytes_per_token
    # the residual keeps a V sum per block beside K: one row in 16 tokens, still under 55% of the full cache per token
    residual = LLM(str(model_dir), dtype="float32", kv_cache_memory=1 << 20, kv_method="kcache", kv_method_config={"residual": True}).engine
    (g,) = residual.memory_plan.groups
    assert g.bytes_per_block * 16 == plan.groups[0].bytes_per_block * 17
    assert g.bytes_per_block / full.groups[0].bytes_per_block <= 0.55
    sums = residual.storage.groups[0].value_sums.home
    assert sums.device == storage.k.home.device and sums.shape == (*storage.k.home.shape[:2], g.num_blocks, storage.k.home.shape[-1])


@pytest.mark.parametrize("preemption_mode, residual", [("swap", False), ("recompute", False), ("swap", True)])
def test_outputs_survive_preemption_and_share_blocks(model_dir, preemption_mode, residual):
    """Six requests in a pool too small for them all, and two greedy samples of one prompt forking its blocks; every block
    comes back. Swapped out and in, K and V blocks (and the residual's V sums) keep what they held, so each output equals
    the one it gets alone.
    Recomputed, a request finishes whole, but not necessarily with the same tokens: the recompute prefill attends to all
    of V where the decode steps it replaces read Top-N, so later layers' K and V differ (as with Quest)."""
    prompts = prompts_of([90, 70, 100, 80, 95, 60], 512, seed=33)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    kw = dict(dtype="float32", kv_method="kcache", kv_method_config={"top_n": 32, "residual": residual})
    alone = [LLM(str(model_dir), kv_cache_memory=1 << 22, **kw).generate({"prompt_token_ids": p}, params, use_tqdm=False)[0] for p in prompts]
    probe = LLM(str(model_dir), kv_cache_memory=1 << 22, **kw).engine.memory_plan.groups[0]
    tight = LLM(str(model_dir), kv_cache_memory=20 * probe.bytes_per_block, preemption_mode=preemption_mode, swap_space=0.01, **kw)
    together = tight.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert tight.get_metrics()["num_preemptions"] > 0
    if preemption_mode == "swap":
        assert [o.outputs[0].token_ids for o in together] == [o.outputs[0].token_ids for o in alone]
    assert [len(o.outputs[0].token_ids) for o in together] == [40] * 6
    twice = tight.generate({"prompt_token_ids": prompts[0]}, SamplingParams(n=2, temperature=0, max_tokens=40, ignore_eos=True), use_tqdm=False)[0]
    assert [o.token_ids for o in twice.outputs] == [alone[0].outputs[0].token_ids] * 2
    assert tight.get_metrics()["kv_blocks_used"] == 0


@pytest.mark.parametrize("residual", [False, True])
def test_a_prefix_hit_reuses_k_and_v_blocks(model_dir, residual):
    """A second prompt sharing 64 tokens hits them (K and V of the same blocks, and their V sums) and decodes as it does
    with caching off."""
    shared, a, b = prompts_of([64, 30, 40], 512, seed=34)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    kw = dict(dtype="float32", kv_cache_memory=1 << 22, kv_method="kcache", kv_method_config={"top_n": 16, "residual": residual})
    cold = LLM(str(model_dir), enable_prefix_caching=False, **kw).generate({"prompt_token_ids": shared + b}, params, use_tqdm=False)[0]
    llm = LLM(str(model_dir), **kw)
    llm.generate({"prompt_token_ids": shared + a}, params, use_tqdm=False)
    hit = llm.generate({"prompt_token_ids": shared + b}, params, use_tqdm=False)[0]
    assert hit.num_cached_tokens == 64
    assert hit.outputs[0].token_ids == cold.outputs[0].token_ids


@pytest.mark.parametrize("kw, field", [
    ({"kv_method_config": {"top_n": 0}}, "kv_method_config.top_n"),
    ({"kv_method_config": {"top_n": 2.5}}, "kv_method_config.top_n"),
    ({"kv_method_config": {"top_n": "64"}}, "kv_method_config.top_n"),
    ({"kv_method_config": {"top_n": 64, "budget": 32}}, "kv_method_config.top_n"),
    ({"kv_method_config": {"budget": -1}}, "kv_method_config.budget"),
    ({"kv_method_config": {"dense_layers": -1}}, "kv_method_config.dense_layers"),
    ({"kv_method_config": {"dense_layers": 2}}, "kv_method_config.dense_layers"),  # the model has 2 layers
    ({"kv_method_config": {"renormalize": "yes"}}, "kv_method_config.renormalize"),
    ({"kv_method_config": {"residual": 1}}, "kv_method_config.residual"),
    ({"kv_method_config": {"residual": True, "renormalize": True}}, "kv_method_config.renormalize"),
    ({"kv_method_config": {"top_k": 64}}, "kv_method_config"),
    ({"kv_host_memory": 0}, "kv_host_memory"),
])
def test_bad_configuration_fails_at_start_naming_the_flag(model_dir, kw, field):
    with pytest.raises(InvalidArgumentError) as e:
        LLM(str(model_dir), dtype="float32", kv_method="kcache", **kw)
    assert e.value.field == field


def test_a_host_tier_too_small_for_one_sequence_fails_at_start(model_dir):
    row = LLM(str(model_dir), dtype="float32", kv_cache_memory=1 << 20, kv_method="kcache").engine.memory_plan.groups[0].group.tier_bytes_per_block
    with pytest.raises(OutOfKVCacheError, match="kv_host_memory"):
        LLM(str(model_dir), dtype="float32", kv_method="kcache", kv_host_memory=row * 31)  # 512 tokens need 32 blocks of 16
    LLM(str(model_dir), dtype="float32", kv_method="kcache", kv_host_memory=row * 32)
    with pytest.raises(InvalidArgumentError) as e:
        LLM(str(model_dir), dtype="float32", kv_host_memory=1 << 20)  # no method keeps V in the host tier
    assert e.value.field == "kv_host_memory"
