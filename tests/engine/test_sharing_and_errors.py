"""Block sharing is real (n > 1 shares the prompt), and bad input fails loudly without harming other requests."""

from __future__ import annotations

import json

import pytest

from kvtier import LLM, InvalidArgumentError, ModelNotFoundError, SamplingParams, UnsupportedArchitectureError
from kvtier.engine.metrics import engine_metrics
from kvtier.models.checkpoint_builder import build_random_checkpoint


@pytest.fixture(scope="module")
def long_ctx_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("longctx")
    return build_random_checkpoint(path, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                                   vocab_size=512, max_position_embeddings=2048, tokenizer_vocab_size=512)


def peak_blocks(llm: LLM, prompt: list[int], params: SamplingParams) -> int:
    engine = llm.engine
    engine.add_request({"prompt_token_ids": prompt}, params)
    peak = 0
    while engine.has_unfinished_requests():
        engine.step()
        peak = max(peak, engine_metrics(engine, with_waste=False)["kv_blocks_used"])
    return peak


def test_parallel_sampling_shares_prompt_blocks(long_ctx_dir):
    prompt = [3 + i % 500 for i in range(1000)]
    def fresh() -> LLM:
        return LLM(str(long_ctx_dir), enable_prefix_caching=False, kv_cache_memory=1 << 24)

    single = peak_blocks(fresh(), prompt, SamplingParams(n=1, max_tokens=32, ignore_eos=True, seed=0))
    eight = peak_blocks(fresh(), prompt, SamplingParams(n=8, max_tokens=32, ignore_eos=True, seed=0, temperature=1.0))
    assert single >= 1000 // 16
    assert eight < 2 * single, (single, eight)


def test_n_samples_are_distinct_and_reproducible(long_ctx_dir):
    llm = LLM(str(long_ctx_dir), kv_cache_memory=1 << 24)
    params = SamplingParams(n=4, max_tokens=12, ignore_eos=True, seed=7, temperature=1.0)
    a = llm.generate({"prompt_token_ids": list(range(3, 40))}, params, use_tqdm=False)[0]
    b = llm.generate([{"prompt_token_ids": list(range(5, 90))}, {"prompt_token_ids": list(range(3, 40))}], params, use_tqdm=False)[1]
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert len({tuple(o.token_ids) for o in a.outputs}) > 1
    assert [o.index for o in a.outputs] == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "prompt,params,field",
    [
        ("", SamplingParams(), "prompt"),
        ({"prompt_token_ids": []}, SamplingParams(), "prompt_token_ids"),
        ({"prompt_token_ids": [1, 99999]}, SamplingParams(), "prompt_token_ids"),
        ({"prompt_token_ids": [3 + i % 500 for i in range(2048)]}, SamplingParams(), "prompt"),
    ],
)
def test_bad_prompts_name_the_field(long_ctx_dir, prompt, params, field):
    llm = LLM(str(long_ctx_dir), kv_cache_memory=1 << 24)
    with pytest.raises(InvalidArgumentError) as e:
        llm.generate(prompt, params, use_tqdm=False)
    assert e.value.field == field


@pytest.mark.parametrize(
    "kwargs,field",
    [({"max_tokens": 0}, "max_tokens"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"temperature": -0.1}, "temperature")],
)
def test_bad_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(InvalidArgumentError) as e:
        SamplingParams(**kwargs)
    assert e.value.field == field


def test_bad_engine_args(tmp_path, long_ctx_dir):
    with pytest.raises(ModelNotFoundError, match="model"):
        LLM(str(tmp_path / "nope"))
    with pytest.raises(InvalidArgumentError) as e:
        LLM(str(long_ctx_dir), block_sizes=4)
    assert e.value.field == "block_sizes"
    with pytest.raises(InvalidArgumentError) as e:
        LLM(str(long_ctx_dir), block_size=0, kv_cache_memory=1 << 24)
    assert e.value.field == "block_size"
    with pytest.raises(InvalidArgumentError) as e:
        LLM(str(long_ctx_dir), attention_backend="flash", kv_cache_memory=1 << 24)
    assert e.value.field == "attention_backend" and "paged" in e.value.message and "'flash'" in e.value.message
    with pytest.raises(InvalidArgumentError) as e:
        LLM(str(long_ctx_dir), prefix_caching_hash_algo="md5", kv_cache_memory=1 << 24)
    assert e.value.field == "prefix_caching_hash_algo" and "sha256" in e.value.message
    bad = tmp_path / "gpt2"
    bad.mkdir()
    cfg = json.loads((long_ctx_dir / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitectureError, match="GPT2LMHeadModel.*LlamaForCausalLM"):
        LLM(str(bad))


def test_engine_keeps_serving_after_a_bad_request(long_ctx_dir):
    llm = LLM(str(long_ctx_dir), kv_cache_memory=1 << 24)
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    prompts = [list(range(3, 30)), list(range(40, 90))]
    alone = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)]
    engine = llm.engine
    ids = [engine.add_request({"prompt_token_ids": p}, params) for p in prompts]
    engine.step()
    with pytest.raises(InvalidArgumentError):
        engine.add_request("", params)
    with pytest.raises(InvalidArgumentError):
        engine.add_request({"prompt_token_ids": [3 + i % 500 for i in range(4000)]}, params)
    results = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            results[out.request_id] = out.outputs[0].token_ids
    assert [results[i] for i in ids] == alone
