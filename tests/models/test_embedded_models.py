"""The models shipped in the package: they load in transformers and in kvtier by name, kvtier matches
HF's logits on them, their tokenizer round-trips text, and they respect the size limits."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers
from safetensors import safe_open

from kvtier import LLM, SamplingParams
from kvtier.config import EngineArgs
from kvtier.errors import ModelNotFoundError
from kvtier.eval.retrieval import passkey
from kvtier.models.embedded import DEFAULT_MODEL, embedded_models, resolve_model
from kvtier.models.loader import resolve_model_path
from kvtier.training.corpus import read_texts, split_corpus
from tests.engine.test_hf_parity import check_against_hf

SHIPPED = sorted(embedded_models())


def test_the_default_model_ships():
    assert DEFAULT_MODEL in SHIPPED
    assert EngineArgs().model == str(embedded_models()[DEFAULT_MODEL])


@pytest.mark.parametrize("name", SHIPPED)
def test_files_and_size_limits(name):
    folder = embedded_models()[name]
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md", "loss_curve.png"):
        assert (folder / f).is_file(), f
    assert (folder / "model.safetensors").stat().st_size <= 40e6
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys()) <= 20e6
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert json.loads((folder / "config.json").read_text())["max_position_embeddings"] >= 2048


@pytest.mark.parametrize("name", SHIPPED)
def test_hf_loads_and_generates(name):
    folder = embedded_models()[name]
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = tok("def add(a, b):", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=8, do_sample=False, min_new_tokens=8)
    assert out.shape[1] == ids.shape[1] + 8


@pytest.mark.parametrize("name", SHIPPED)
def test_tokenizer_round_trips_held_out_source(name):
    folder = embedded_models()[name]
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    llm_tok = LLM(name, kv_cache_memory=1 << 22).get_tokenizer() if name == DEFAULT_MODEL else None
    for text in read_texts(split_corpus().validation[:5]):
        text = text[:4000]
        ids = hf(text).input_ids
        assert hf.decode(ids, skip_special_tokens=True) == text
        if llm_tok is not None:
            assert llm_tok.encode(text) == ids


def test_engine_matches_hf_logits_on_kvtier_tiny():
    folder = embedded_models()["kvtier-tiny"]
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    texts = ["def fibonacci(n):", "import os\nimport sys\n\n\nclass Config:\n    \"\"\"Settings", "for i in range(10):\n    print(i)\n"]
    check_against_hf(folder, [tok(t).input_ids for t in texts], max_tokens=8, dtype=torch.float32, kv_cache_memory=1 << 24)


def test_engine_by_name_retrieves_a_passkey():
    """The model card's claim, spot-checked through the engine at 1K tokens (10 trials, depths 0..1)."""
    llm = LLM("kvtier-tiny", dtype="float32", kv_cache_memory=1 << 26)
    samples = [passkey(llm.get_tokenizer(), 1024, i / 9, seed=100 + i) for i in range(10)]
    outs = llm.generate([s.prompt for s in samples], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    assert sum(s.is_correct(o.outputs[0].text) for s, o in zip(samples, outs)) >= 8


def test_unknown_name_lists_the_shipped_models():
    with pytest.raises(ModelNotFoundError, match="kvtier-tiny"):
        resolve_model_path("kvtier-huge")


def test_the_hybrid_runs_by_name_and_matches_hf_logits():
    """kvtier-tiny-hybrid (Bamba) through the engine: greedy tokens and logits at every position as transformers'."""
    folder = embedded_models()["kvtier-tiny-hybrid"]
    assert resolve_model("kvtier-tiny-hybrid") == str(folder)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    texts = ["def fibonacci(n):", "import os\nimport sys\n\n\nclass Config:\n    \"\"\"Settings"]
    check_against_hf(folder, [tok(t).input_ids for t in texts], max_tokens=8, dtype=torch.float32)


