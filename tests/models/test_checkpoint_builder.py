"""build_random_checkpoint: transformers must load what it writes, exactly and deterministically."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from kvtier.errors import InvalidArgumentError
from kvtier.models.checkpoint_builder import build_random_checkpoint

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, vocab_size=512,
            max_position_embeddings=256, tokenizer_vocab_size=300)
# Worked by hand for TINY (head_dim 16, so k/v project to 2 * 16 = 32):
#   embed 512*64 = 32768; per layer q 64*64 + k 32*64 + v 32*64 + o 64*64 = 12288, mlp 3*128*64 = 24576, two norms 128
#   -> 36992, times 2 layers = 73984; final norm 64; lm_head 32768 unless tied.
PARAMS_UNTIED = 32768 + 73984 + 64 + 32768  # 139584
PARAMS_TIED = 32768 + 73984 + 64  # 106816
LEGACY_KEYS = {"rope_theta", "torch_dtype"}  # transformers-4 spellings written alongside the v5 keys


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return build_random_checkpoint(tmp_path_factory.mktemp("ckpt"), **TINY)


def hf_load(path: Path, **kwargs):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kwargs)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"] and not info["error_msgs"], info
    return model


@pytest.mark.parametrize(
    "architecture, tie, expected",
    [("LlamaForCausalLM", False, PARAMS_UNTIED), ("LlamaForCausalLM", True, PARAMS_TIED), ("MistralForCausalLM", False, PARAMS_UNTIED)],
)
def test_transformers_loads_every_tensor(tmp_path, architecture, tie, expected):
    path = build_random_checkpoint(tmp_path, **TINY, architecture=architecture, tie_word_embeddings=tie)
    model = hf_load(path)
    assert type(model).__name__ == architecture
    assert sum(p.numel() for p in model.parameters()) == expected
    stored = load_file(path / "model.safetensors")
    assert sum(t.numel() for t in stored.values()) == expected
    assert ("lm_head.weight" in stored) == (not tie)
    hf_state = model.state_dict()
    for name, tensor in stored.items():
        assert torch.equal(hf_state[name], tensor), name
    if tie:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    logits = model(torch.tensor([[0, 5, 9]])).logits
    assert logits.shape == (1, 3, TINY["vocab_size"]) and torch.isfinite(logits).all()


def test_tensor_names_and_init(folder):
    stored = load_file(folder / "model.safetensors")
    per_layer = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                 "mlp.down_proj", "input_layernorm", "post_attention_layernorm"]
    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    expected |= {f"model.layers.{i}.{m}.weight" for i in range(2) for m in per_layer}
    assert set(stored) == expected
    assert stored["model.layers.1.self_attn.k_proj.weight"].shape == (32, 64)
    assert stored["model.layers.0.mlp.down_proj.weight"].shape == (64, 128)
    for name, t in stored.items():
        assert t.dtype == torch.float32
        if "norm" in name:
            assert torch.equal(t, torch.ones(64)), name
    emb = stored["model.embed_tokens.weight"]
    assert abs(emb.mean().item()) < 1e-3 and abs(emb.std().item() - 0.02) < 5e-4


def test_config_is_what_transformers_writes(folder):
    ours = json.loads((folder / "config.json").read_text())
    assert ours["rope_theta"] == 10000.0 and ours["torch_dtype"] == ours["dtype"] == "float32"
    fields = {k: v for k, v in ours.items() if k not in LEGACY_KEYS | {"model_type"}}
    reference = json.loads(transformers.AutoConfig.for_model(ours["model_type"], **fields).to_json_string())
    reference.pop("transformers_version")
    assert {k: v for k, v in ours.items() if k not in LEGACY_KEYS} == reference

    loaded = transformers.AutoConfig.from_pretrained(folder)
    assert loaded.model_type == "llama" and loaded.architectures == ["LlamaForCausalLM"]
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size", "vocab_size",
                "max_position_embeddings"):
        assert getattr(loaded, key) == TINY[key], key
    assert loaded.head_dim == 16 and loaded.rope_parameters["rope_theta"] == 10000.0 and loaded.hidden_act == "silu"
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (0, 1, 2)
    assert not loaded.tie_word_embeddings and not loaded.attention_bias and not loaded.mlp_bias and loaded.use_cache
    assert loaded.dtype == torch.float32


def test_tokenizer_files(folder):
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    assert hf.convert_ids_to_tokens([0, 1, 2]) == ["<s>", "</s>", "<pad>"]
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2)
    assert len(hf) == TINY["tokenizer_vocab_size"] and hf.model_max_length == TINY["max_position_embeddings"]
    assert hf("x = 1")["input_ids"][0] == 0 and hf.decode(hf("x = 1")["input_ids"], skip_special_tokens=True) == "x = 1"
    assert hf.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True) == "<|user|>\nhi</s>\n<|assistant|>\n"
    generation = transformers.GenerationConfig.from_pretrained(folder)
    assert (generation.bos_token_id, generation.eos_token_id) == (0, 1)


def test_bfloat16(tmp_path):
    path = build_random_checkpoint(tmp_path, **TINY, dtype="bfloat16")
    assert {t.dtype for t in load_file(path / "model.safetensors").values()} == {torch.bfloat16}
    assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"
    assert hf_load(path, dtype="auto").dtype == torch.bfloat16


def test_same_seed_same_bytes_other_seed_other_weights(folder, tmp_path):
    again = build_random_checkpoint(tmp_path / "again", **TINY)
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (again / name).read_bytes() == (folder / name).read_bytes(), name
    other = load_file(build_random_checkpoint(tmp_path / "other", **TINY, seed=1) / "model.safetensors")
    base = load_file(folder / "model.safetensors")
    for name, t in base.items():
        assert torch.equal(t, other[name]) == ("norm" in name), name


@pytest.mark.parametrize(
    "override, field",
    [
        (dict(hidden_size=0), "hidden_size"),
        (dict(num_hidden_layers=-1), "num_hidden_layers"),
        (dict(intermediate_size=True), "intermediate_size"),
        (dict(vocab_size=512.0), "vocab_size"),
        (dict(max_position_embeddings=None), "max_position_embeddings"),
        (dict(num_attention_heads=5), "num_attention_heads"),  # 64 % 5 != 0
        (dict(num_key_value_heads=3), "num_key_value_heads"),  # 4 % 3 != 0
        (dict(dtype="int8"), "dtype"),
        (dict(architecture="GPT2LMHeadModel"), "architecture"),
        (dict(seed=-1), "seed"),
        (dict(tie_word_embeddings="yes"), "tie_word_embeddings"),
        (dict(tokenizer_vocab_size=200), "tokenizer_vocab_size"),  # below 256 bytes + 3 specials
        (dict(tokenizer_vocab_size=513), "tokenizer_vocab_size"),  # more ids than embedding rows
    ],
)
def test_bad_arguments_name_their_field(tmp_path, override, field):
    with pytest.raises(InvalidArgumentError) as err:
        build_random_checkpoint(tmp_path / "out", **{**TINY, **override})
    assert err.value.field == field
    assert not (tmp_path / "out").exists()  # validated before anything is written
