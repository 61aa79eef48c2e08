"""Checkpoint loading: sharded safetensors with an index file, and errors that name what is missing."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from kvtier import LLM, ModelNotFoundError, SamplingParams
from tests.hf_checkpoints import save_hf_checkpoint


def test_sharded_checkpoint_loads_and_matches_unsharded(tmp_path, tokenizer_files):
    whole = save_hf_checkpoint(tmp_path / "whole", tokenizer_files, "LlamaForCausalLM")
    model = transformers.AutoModelForCausalLM.from_pretrained(whole)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="100KB")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (sharded / f).write_bytes((whole / f).read_bytes())
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1, "the checkpoint should really be sharded"
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=2)
    prompt = {"prompt_token_ids": [0, 5, 9, 200, 31]}
    a = LLM(str(whole), kv_cache_memory=1 << 22).generate(prompt, params, use_tqdm=False)[0].outputs[0]
    b = LLM(str(sharded), kv_cache_memory=1 << 22).generate(prompt, params, use_tqdm=False)[0].outputs[0]
    assert a.token_ids == b.token_ids
    assert all(abs(x[t].logprob - y[t].logprob) < 1e-6 for x, y, t in zip(a.logprobs, b.logprobs, a.token_ids))


def test_missing_shard_is_named(tmp_path, tokenizer_files):
    whole = save_hf_checkpoint(tmp_path / "m", tokenizer_files, "LlamaForCausalLM")
    model = transformers.AutoModelForCausalLM.from_pretrained(whole)
    sharded = tmp_path / "s"
    model.save_pretrained(sharded, max_shard_size="100KB")
    (sharded / "tokenizer.json").write_bytes((whole / "tokenizer.json").read_bytes())
    victim = sorted(sharded.glob("*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(ModelNotFoundError, match=victim.name):
        LLM(str(sharded), kv_cache_memory=1 << 22)


def test_missing_weights_and_tensors_are_named(tmp_path, tokenizer_files):
    path = save_hf_checkpoint(tmp_path / "w", tokenizer_files, "LlamaForCausalLM")
    from safetensors.torch import load_file, save_file

    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(KeyError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        LLM(str(path), kv_cache_memory=1 << 22)
    (path / "model.safetensors").unlink()
    with pytest.raises(ModelNotFoundError, match=r"\*\.safetensors"):
        LLM(str(path), kv_cache_memory=1 << 22)


def test_use_beam_search_flag_equals_beam_search_params(llama_dir):
    from kvtier import BeamSearchParams

    llm = LLM(str(llama_dir), kv_cache_memory=1 << 22)
    prompt = {"prompt_token_ids": [0, 44, 3, 91]}
    via_flag = llm.generate(prompt, SamplingParams(n=3, use_beam_search=True, temperature=0, max_tokens=5, ignore_eos=True), use_tqdm=False)[0]
    via_params = llm.beam_search(prompt, BeamSearchParams(beam_width=3, max_tokens=5, ignore_eos=True))[0]
    assert [o.token_ids for o in via_flag.outputs] == [o.token_ids for o in via_params.outputs]
    assert len(via_flag.outputs) == 3 and torch.tensor([o.cumulative_logprob for o in via_flag.outputs]).diff().le(0).all()
