"""Greedy tokens and per-position logits of the engine match HF transformers on the same weights.

Every generated position is checked: the engine's logits at each step (captured from the model
runner) against HF's logits from one teacher-forced forward over prompt + generated tokens.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from kvtier import LLM, SamplingParams
from kvtier.cache.prefix_cache import HASH_ALGOS
from tests.hf_checkpoints import save_hf_checkpoint

TOL = 1e-4
BACKENDS = ["paged", "cpu"]  # the reference backend and the fast one: both held to HF


class LogitSpy:
    """Wraps the runner to record, per sequence, the logits the sampler saw at each step."""

    def __init__(self, llm: LLM) -> None:
        self.by_seq: dict[int, list[torch.Tensor]] = {}
        runner = llm.engine.runner
        inner = runner.execute

        def execute(*args, **kwargs):
            out = inner(*args, **kwargs)
            for sid, logits in out.last.items():
                self.by_seq.setdefault(sid, []).append(logits.cpu())
            return out

        runner.execute = execute


def prompts_of(lengths: list[int], vocab: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in lengths]


def check_against_hf(path, prompts, max_tokens=8, dtype=torch.float32, tol=TOL, llm=None, **engine_kw):
    llm = llm or LLM(str(path), dtype=str(dtype).removeprefix("torch."), **engine_kw)
    if "attention_backend" in engine_kw:  # no silent fallback: the backend asked for is the one under test
        assert llm.engine.attention.name == engine_kw["attention_backend"]
    spy = LogitSpy(llm)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    seq_ids = sorted(spy.by_seq)  # engine seq ids are increasing in request order
    worst = 0.0
    for prompt, out, sid in zip(prompts, outs, seq_ids):
        gen = out.outputs[0].token_ids
        assert len(gen) == max_tokens
        with torch.no_grad():
            ref = hf(torch.tensor([prompt + gen])).logits[0].float()
        mine = torch.stack(spy.by_seq[sid])
        expect = ref[len(prompt) - 1 : len(prompt) - 1 + max_tokens]
        worst = max(worst, (mine - expect).abs().max().item())
        assert gen == expect.argmax(-1).tolist(), "greedy token differs from HF argmax"
        hf_greedy = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long), max_new_tokens=max_tokens,
                                do_sample=False, min_new_tokens=max_tokens, pad_token_id=0)
        # HF's min_new_tokens keeps generating by suppressing EOS, which ignore_eos does not: compare up to an argmax EOS
        eos = set(_as_list(hf.generation_config.eos_token_id))
        upto = next((i for i, t in enumerate(gen) if t in eos), len(gen))
        assert hf_greedy[0, len(prompt):len(prompt) + upto].tolist() == gen[:upto]
    assert worst <= tol, f"max abs logit difference {worst} > {tol}"
    return llm


def _as_list(ids: int | list[int] | None) -> list[int]:
    return [] if ids is None else [ids] if isinstance(ids, int) else list(ids)


MIXED = [5, 17, 33, 1, 64, 40]


@pytest.mark.parametrize(
    "arch,overrides",
    [
        ("LlamaForCausalLM", {}),
        ("LlamaForCausalLM", {"num_key_value_heads": 1}),  # MQA
        ("LlamaForCausalLM", {"num_key_value_heads": 4, "tie_word_embeddings": True}),
        ("LlamaForCausalLM", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
        ("LlamaForCausalLM", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                               "original_max_position_embeddings": 32}}),
        ("LlamaForCausalLM", {"attention_bias": True, "mlp_bias": True}),
        ("Qwen2ForCausalLM", {}),
        ("Qwen3ForCausalLM", {"head_dim": 32}),
        ("MistralForCausalLM", {"sliding_window": 8}),
    ],
    ids=["llama-gqa", "llama-mqa", "llama-mha-tied", "llama-rope-linear", "llama-rope-llama3", "llama-bias", "qwen2", "qwen3", "mistral-sliding"],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_architectures_match_hf(tmp_path, tokenizer_files, arch, overrides, backend):
    path = save_hf_checkpoint(tmp_path, tokenizer_files, arch, **overrides)
    check_against_hf(path, prompts_of(MIXED, 512), kv_cache_memory=1 << 22, attention_backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunked,budget", [(True, 24), (True, 2048), (False, 512)])
def test_chunked_prefill_on_and_off(llama_dir, chunked, budget, backend):
    check_against_hf(llama_dir, prompts_of([70, 9, 45, 130], 512, seed=2), enable_chunked_prefill=chunked, max_num_batched_tokens=budget,
                     kv_cache_memory=1 << 22, attention_backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_preemption_under_tiny_block_budget(llama_dir, mode, backend):
    """12 blocks of 16 slots for 6 sequences that need ~4 blocks each: preemption must happen, outputs stay exact."""
    per_block = 2 * 2 * 2 * 16 * 16 * 4  # K+V, layers, kv heads, head_dim, block_size, fp32
    llm = check_against_hf(
        llama_dir, prompts_of([30, 40, 35, 45, 20, 38], 512, seed=3), max_tokens=24,
        kv_cache_memory=12 * per_block, preemption_mode=mode, swap_space=0.01, attention_backend=backend,
    )
    assert llm.get_metrics()["num_preemptions"] > 0


def test_prefix_cache_hits_give_same_logits(llama_dir):
    shared = prompts_of([48], 512, seed=4)[0]
    tails = prompts_of([3, 9, 20], 512, seed=5)
    llm = check_against_hf(llama_dir, [shared + t for t in tails], kv_cache_memory=1 << 22)
    assert llm.get_metrics()["prefix_cache_hits"] == 0  # all three were admitted in the same step
    # second round on the same engine: each prompt's 3 shared blocks come from the cache
    check_against_hf(llama_dir, [shared + t[::-1] for t in tails], llm=llm)
    m = llm.get_metrics()
    assert m["prefix_cache_hits"] == 3 * 48, m


def test_bfloat16_close_to_hf(tmp_path, tokenizer_files):
    path = save_hf_checkpoint(tmp_path, tokenizer_files, "LlamaForCausalLM", dtype=torch.bfloat16)
    llm = LLM(str(path), dtype="bfloat16", kv_cache_memory=1 << 22)
    assert llm.engine.model.embed_tokens.weight.dtype == torch.bfloat16
    prompt = prompts_of([20], 512)[0]
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), -1)
    mine = [next(iter(d.values())).logprob for d in out.prompt_logprobs[1:]]
    want = [ref[i, prompt[i + 1]].item() for i in range(len(prompt) - 1)]
    assert max(abs(a - b) for a, b in zip(mine, want)) < 0.05


def test_colliding_prefix_keys_never_serve_another_prompts_kv(llama_dir, monkeypatch):
    """The block-hash cache (``prefix_cache_policy="hash"``) with every block key forced to one value (a crafted
    collision): each prompt still gets HF's own greedy output, and a prompt seen before still hits its own first block.
    The radix tree compares tokens, so the same prompts hit both blocks there."""
    monkeypatch.setitem(HASH_ALGOS, "builtin", lambda parent, tokens: 0)
    first, second = prompts_of([40, 40], 512, seed=6)
    llm = check_against_hf(llama_dir, [first], kv_cache_memory=1 << 22, prefix_caching_hash_algo="builtin", prefix_cache_policy="hash")
    check_against_hf(llama_dir, [second], llm=llm)  # same key as `first`'s blocks, other tokens: a miss, not a wrong hit
    assert llm.get_metrics()["prefix_cache_hits"] == 0
    check_against_hf(llama_dir, [first], llm=llm)
    assert llm.get_metrics()["prefix_cache_hits"] == 16  # its first block; the next key is taken, so the chain stops there
    tree = check_against_hf(llama_dir, [first], kv_cache_memory=1 << 22)
    check_against_hf(llama_dir, [second], llm=tree)
    check_against_hf(llama_dir, [first], llm=tree)
    assert tree.get_metrics()["prefix_cache_hits"] == 32
