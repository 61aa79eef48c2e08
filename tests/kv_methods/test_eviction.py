"""Evicting methods (StreamingLLM, SnapKV) through the engine against transformers on the same weights with its cache cut
to the same kept positions, and what an evicting method must not break: the freed blocks, forks sharing the compressed
blocks, recompute after preemption, and the prefix cache its uncompressed prompt blocks stay in."""

from __future__ import annotations

import pytest
import torch
import transformers
from sliding_window import peak_decoding, random_prompts  # benchmarks/sliding_window.py

from kvtier import LLM, SamplingParams
from kvtier.errors import InvalidArgumentError
from kvtier.kv_methods.base import KVMethodConfig
from tests.engine.test_hf_parity import LogitSpy, prompts_of
from tests.hf_checkpoints import save_hf_checkpoint

TOL = 1e-4


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tokenizer_files):
    """A random GQA Llama (4 heads, 2 KV heads, 2 layers), fp32, built by transformers."""
    return save_hf_checkpoint(tmp_path_factory.mktemp("llama"), tokenizer_files, "LlamaForCausalLM")


def record_kept(llm: LLM) -> list[torch.Tensor]:
    """Every kept-position choice the engine's method makes, [layers, kv_heads, kept] each, in order."""
    method, kept = llm.engine.compression.method, []
    choose = method.after_prefill

    def after_prefill(prompt):
        keep = choose(prompt)
        kept.append(keep)
        return keep

    method.after_prefill = after_prefill
    return kept


def engine_logits(path, prompt, max_tokens, **engine_kw):
    """Greedy tokens, the logits each was sampled from, and the kept positions of the engine's method (if any)."""
    llm = LLM(str(path), dtype="float32", kv_cache_memory=1 << 22, **engine_kw)
    spy = LogitSpy(llm)
    kept = record_kept(llm) if llm.engine.compression.method else []
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True), use_tqdm=False)[0]
    (logits,) = spy.by_seq.values()
    return out.outputs[0].token_ids, torch.stack(logits), kept


@torch.no_grad()
def _hf_on_kept_cache(path, prompt, keep, tokens):
    """transformers' logits for ``tokens`` fed one at a time after the prompt, its cache cut to ``keep`` [layers, kv_heads, n]
    after prefill; each token keeps its position in the full sequence (RoPE is not re-applied to kept keys)."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = hf(torch.tensor([prompt]), use_cache=True)
    cache, logits = out.past_key_values, [out.logits[0, -1]]
    heads = torch.arange(keep.shape[1])[:, None]
    for layer, kept in zip(cache.layers, keep):
        layer.keys, layer.values = layer.keys[:, heads, kept], layer.values[:, heads, kept]
    for i, t in enumerate(tokens[:-1]):
        out = hf(torch.tensor([[t]]), position_ids=torch.tensor([[len(prompt) + i]]), past_key_values=cache, use_cache=True)
        logits.append(out.logits[0, -1])
    return torch.stack(logits)


@pytest.mark.parametrize("method, config", [
    ("streamingllm", {"budget": 0.25}), ("streamingllm", {"budget": 24}), ("streamingllm", {"budget": 0.5, "n_sink": 2}),
    ("snapkv", {"budget": 0.25, "window_size": 16}), ("snapkv", {"budget": 30, "window_size": 8, "pooling": "max"}),
])
def test_the_engine_after_eviction_matches_transformers_on_the_kept_cache(llama_dir, method, config):
    """Whatever positions the method keeps, the engine's logits after compression are transformers' on its cache cut to them."""
    prompt = prompts_of([70], 512, seed=11)[0]
    tokens, mine, (keep,) = engine_logits(llama_dir, prompt, 8, kv_method=method, kv_method_config=config)
    assert keep.shape[:2] == (2, 2) and keep.shape[-1] == KVMethodConfig(budget=config["budget"]).kept(len(prompt))
    expect = _hf_on_kept_cache(llama_dir, prompt, keep, tokens)
    assert (mine - expect).abs().max().item() <= TOL
    assert tokens == expect.argmax(-1).tolist()
    full_tokens, full, _ = engine_logits(llama_dir, prompt, 8)
    assert (full[1:] - mine[1:]).abs().max().item() > 1e-3, "eviction changed nothing: the test could not fail"


def test_snapkv_chooses_the_same_whatever_the_chunks_and_the_prefix_cache(llama_dir):
    """The observation window's queries are gathered across prefill chunks (a 16-token window over 7-token chunks), and a
    prefix hit stops before the window, so its queries are computed again: the same kept positions, the same tokens."""
    prompt = prompts_of([70], 512, seed=16)[0]
    kw = dict(kv_method="snapkv", kv_method_config={"budget": 0.25, "window_size": 16})
    tokens, logits, (keep,) = engine_logits(llama_dir, prompt, 6, **kw)
    chunked, chunked_logits, (chunked_keep,) = engine_logits(llama_dir, prompt, 6, max_num_batched_tokens=7, **kw)
    assert torch.equal(chunked_keep, keep) and chunked == tokens and (chunked_logits - logits).abs().max().item() <= 1e-4
    llm = LLM(str(llama_dir), dtype="float32", kv_cache_memory=1 << 22, enable_prefix_caching=True, **kw)
    kept = record_kept(llm)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outs = [llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0] for _ in range(2)]
    assert outs[1].num_cached_tokens == 48, "the hit covers whole blocks before the window (70 - 16 = 54 -> 3 blocks)"
    assert all(torch.equal(k, keep) for k in kept) and all(o.outputs[0].token_ids == tokens for o in outs)


def test_an_abort_mid_window_leaves_nothing_behind(llama_dir):
    """A request aborted while its prefill is inside SnapKV's window: its blocks come back and no queries stay held."""
    llm = LLM(str(llama_dir), dtype="float32", kv_cache_memory=1 << 22, max_num_batched_tokens=60, kv_method="snapkv",
              kv_method_config={"budget": 0.25, "window_size": 16})
    llm.engine.add_request({"prompt_token_ids": prompts_of([70], 512, seed=17)[0]}, SamplingParams(max_tokens=4), "r")
    llm.engine.step()  # 60 of 70 tokens: 6 of the window's 16 queries are held
    assert [len(q) for q in llm.engine.compression.window_rows.values()] == [1]
    llm.engine.abort_request("r")
    assert llm.engine.compression.window_rows == {} and llm.get_metrics()["kv_blocks_used"] == 0



    _, _, (keep,) = engine_logits(llama_dir, prompts_of([70], 512, seed=11)[0], 2, kv_method="streamingllm", kv_method_config={"budget": 0.25})
    assert keep.tolist() == [[[0, 1, 2, 3, *range(57, 70)]] * 2] * 2  # 17 = floor(70 / 4): 4 sinks, the last 13


@pytest.mark.parametrize("method, config", [("streamingllm", {"budget": 1.0}), ("streamingllm", {"budget": 70}),
                                            ("streamingllm", {"budget": 5000}), ("snapkv", {"budget": 1.0, "window_size": 16}),
                                            ("h2o", {"budget": 1.0}), ("h2o", {"budget": 76}), ("quest", {"budget": 1.0}), ("quest", {"budget": 76})])
def test_a_budget_covering_the_context_gives_the_full_cache(llama_dir, method, config):
    prompt = prompts_of([70], 512, seed=12)[0]
    tokens, mine, _ = engine_logits(llama_dir, prompt, 6, kv_method=method, kv_method_config=config)
    full_tokens, full, _ = engine_logits(llama_dir, prompt, 6)
    assert tokens == full_tokens and (mine - full).abs().max().item() <= 1e-5


def test_eviction_frees_blocks_and_forks_share_the_compressed_ones(llama_dir):
    """160 prompt tokens (10 blocks of 16) kept to 32 (2 blocks): after the prefill step the request holds 2 blocks,
    shared by its n = 3 samples until each writes its own next block."""
    llm = LLM(str(llama_dir), dtype="float32", kv_cache_memory=1 << 22, kv_method="streamingllm", kv_method_config={"budget": 32})
    llm.engine.add_request({"prompt_token_ids": prompts_of([160], 512, seed=13)[0]}, SamplingParams(n=3, temperature=1.0, max_tokens=4, seed=1), "r")
    llm.engine.step()
    assert llm.get_metrics()["kv_blocks_used"] == 2
    llm.engine.step()  # each sample writes its 33rd slot into a block of its own
    assert llm.get_metrics()["kv_blocks_used"] == 2 + 3
    while llm.engine.has_unfinished_requests():
        llm.engine.step()
    assert llm.get_metrics()["kv_blocks_used"] == 0


def test_a_quarter_budget_decodes_three_times_the_sequences_in_the_same_memory(tmp_path, tokenizer_files):
    """The memory of four full-cache sequences of 2,048 + 32 tokens. Full cache: at most four decode at once.
    StreamingLLM at 25%: each keeps 512 of its 2,048 prompt tokens once prefilled, so at least three times as many
    decode at once, counted from the engine's running requests, and every block comes back."""
    path = save_hf_checkpoint(tmp_path, tokenizer_files, "LlamaForCausalLM", max_position_embeddings=4096)
    per_token = 2 * 2 * 2 * 16 * 4  # K+V, layers, KV heads, head_dim, fp32 (tests.hf_checkpoints.TINY)
    kw = dict(kv_cache_memory=4 * (2048 + 32) * per_token, enable_prefix_caching=False, dtype="float32")
    full = peak_decoding(LLM(str(path), **kw).engine, random_prompts(8, 2048, 512, seed=8), 32)
    kept = peak_decoding(LLM(str(path), kv_method="streamingllm", kv_method_config={"budget": 0.25}, **kw).engine,
                         random_prompts(24, 2048, 512, seed=8), 32)
    assert full["peak_decoding"] <= 4 and full["blocks_left"] == kept["blocks_left"] == 0
    assert kept["peak_decoding"] >= 3 * full["peak_decoding"], (kept, full)


@pytest.mark.parametrize("method, extra", [("streamingllm", {}), ("snapkv", {"window_size": 16})])
def test_recompute_after_preemption_compresses_again_to_the_same_outputs(llama_dir, method, extra):
    """A pool too small for all six requests at once: some are preempted and recomputed; each output equals the one it gets alone."""
    prompts = prompts_of([90, 70, 100, 80, 95, 60], 512, seed=14)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    kw = dict(dtype="float32", kv_method=method, kv_method_config={"budget": 0.25, **extra})
    alone = [LLM(str(llama_dir), kv_cache_memory=1 << 22, **kw).generate({"prompt_token_ids": p}, params, use_tqdm=False)[0] for p in prompts]
    block = 16 * 2 * 2 * 2 * 16 * 4  # tokens x (K, V) x layers x KV heads x head_dim x fp32
    tight = LLM(str(llama_dir), kv_cache_memory=16 * block, **kw)
    together = tight.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert tight.get_metrics()["num_preemptions"] > 0
    assert [o.outputs[0].token_ids for o in together] == [o.outputs[0].token_ids for o in alone]


def test_prefix_cache_keeps_the_uncompressed_prompt_blocks(llama_dir):
    """The second identical prompt reuses the first's cached prompt blocks (full K/V, never compacted in place) and
    gets the same output; nothing of a compressed cache is offered as a prefix."""
    llm = LLM(str(llama_dir), dtype="float32", kv_cache_memory=1 << 22, kv_method="streamingllm", kv_method_config={"budget": 0.25},
              enable_prefix_caching=True)
    prompt = prompts_of([100], 512, seed=15)[0]
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    first = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
    second = llm.generate({"prompt_token_ids": prompt + first.outputs[0].token_ids}, params, use_tqdm=False)[0]
    again = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    assert again.num_cached_tokens == 96, "the prompt's 6 full blocks came from the prefix cache"
    assert second.num_cached_tokens == 96, "a prompt extending a compressed sequence hits only the uncompressed prompt blocks"


@pytest.mark.parametrize("kw, field", [
    (dict(kv_method="nope"), "kv_method"),
    (dict(kv_method="streamingllm", kv_method_config={"budget": 0}), "kv_method_config.budget"),
    (dict(kv_method="streamingllm", kv_method_config={"budget": 1.5}), "kv_method_config.budget"),
    (dict(kv_method="streamingllm", kv_method_config={"budget": -3}), "kv_method_config.budget"),
    (dict(kv_method="streamingllm", kv_method_config={"budget": "half"}), "kv_method_config.budget"),
    (dict(kv_method="streamingllm", kv_method_config={"n_sink": -1}), "kv_method_config.n_sink"),
    (dict(kv_method="streamingllm", kv_method_config={"window": 3}), "kv_method_config"),
    (dict(kv_method="streamingllm", kv_method_config="{budget"), "kv_method_config"),
    (dict(kv_method="none", kv_method_config={"budget": 0.5}), "kv_method_config"),
])
def test_bad_method_arguments_fail_at_start_naming_the_field(llama_dir, kw, field):
    with pytest.raises(InvalidArgumentError) as e:
        LLM(str(llama_dir), **kw)
    assert e.value.field == field
