"""The training pipeline: a by-file corpus split, the learning-rate schedule, and seeded, reproducible runs
that write a folder transformers loads."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sysconfig
from pathlib import Path

import pytest
import transformers

from kvtier.training.corpus import split_corpus, stdlib_sources
from kvtier.training.recipes import KVTIER_TINY, KVTIER_TINY_HYBRID, TRAIN_MIX, Stage
from kvtier.training.trainer import lr_at, train

SMALL_ROOT = Path(sysconfig.get_paths()["stdlib"]) / "json"
SMALL = dataclasses.replace(
    KVTIER_TINY,
    config={**KVTIER_TINY.config, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
            "num_key_value_heads": 1, "head_dim": 16},
    stages=(Stage(1.0, 1, 512),), warmup_steps=1, mix=dataclasses.replace(TRAIN_MIX, min_tokens=400), circuit=None,
)  # the shipped recipe's documents: every training haystack kind and phrasing, so their draws are part of what must reproduce
SMALL_HYBRID = dataclasses.replace(
    KVTIER_TINY_HYBRID,
    config={**KVTIER_TINY_HYBRID.config, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "attn_layer_indices": [1],
            "num_attention_heads": 2, "num_key_value_heads": 1, "mamba_n_heads": 2, "mamba_d_head": 16, "mamba_d_state": 8},
    stages=SMALL.stages, warmup_steps=1, mix=SMALL.mix, circuit=None,
)


def test_split_is_by_file_disjoint_complete_and_seeded():
    a, b = split_corpus(seed=0), split_corpus(seed=0)
    assert a == b
    assert not set(a.train) & set(a.validation)
    assert set(a.train) | set(a.validation) == set(stdlib_sources())
    assert all("site-packages" not in p.parts for p in a.train)
    assert split_corpus(seed=1).validation != a.validation


def test_learning_rate_warms_up_then_follows_the_cosine():
    r = dataclasses.replace(KVTIER_TINY, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(r, 0, 110) == pytest.approx(0.1)
    assert lr_at(r, 9, 110) == pytest.approx(1.0)
    assert lr_at(r, 10, 110) == pytest.approx(1.0)
    assert lr_at(r, 60, 110) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(r, 110, 110) == pytest.approx(0.1)


def _digest(path: Path) -> str:
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def test_same_seed_same_weights_and_the_folder_loads(tmp_path):
    work = tmp_path / "work"
    first = train(SMALL, tmp_path / "a", work, seed=3, steps=3, corpus_root=SMALL_ROOT)
    second = train(SMALL, tmp_path / "b", work, seed=3, steps=3, corpus_root=SMALL_ROOT)
    assert [r["loss"] for r in first["log"]] == [r["loss"] for r in second["log"]]
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    train(SMALL, tmp_path / "c", work, seed=4, steps=3, corpus_root=SMALL_ROOT)
    assert _digest(tmp_path / "c") != _digest(tmp_path / "a")
    assert (tmp_path / "a" / "loss_curve.png").stat().st_size > 1000
    log = json.loads((tmp_path / "a" / "training_log.json").read_text())
    assert log["tokens"] == 3 * 512 and len(log["log"]) == 3
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    assert model.config.hidden_size == 32
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "a")
    assert tok.decode(tok("def f(x):\n    return 12345").input_ids, skip_special_tokens=True) == "def f(x):\n    return 12345"


@pytest.mark.parametrize("recipe", [SMALL, SMALL_HYBRID], ids=["llama", "bamba"])
def test_the_written_folder_generates_with_transformers(tmp_path, recipe):
    """``generate`` (not just a forward) on the saved folder: it reads generation settings from config.json
    (Bamba's ``num_logits_to_keep``), which a training forward never touches."""
    train(recipe, tmp_path / "m", tmp_path / "work", seed=0, steps=1, corpus_root=SMALL_ROOT)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    ids = transformers.AutoTokenizer.from_pretrained(tmp_path / "m")("def f(x):", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 5)
    assert model.config.architectures == recipe.config["architectures"]
