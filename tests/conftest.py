"""Session fixtures shared by the test suite."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from hypothesis import settings

# CI replays the same examples every run (hypothesis' advice for CI); local runs explore new ones.
settings.register_profile("ci", derandomize=True, deadline=None)
if os.environ.get("CI"):
    settings.load_profile("ci")

# the benchmark scripts import each other as top-level modules (they put their folder on sys.path); tests do the same,
# so that a test and a script share one copy of each module
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from kvtier.models.checkpoint_builder import build_random_checkpoint  # noqa: E402
from tests.hf_checkpoints import save_hf_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer_files(tmp_path_factory) -> Path:
    """A folder whose tokenizer files are copied into the HF-built checkpoints."""
    path = tmp_path_factory.mktemp("tok")
    build_random_checkpoint(path, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, intermediate_size=64,
                            vocab_size=512, tokenizer_vocab_size=512)
    return path


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory, tokenizer_files) -> Path:
    return save_hf_checkpoint(tmp_path_factory.mktemp("llama"), tokenizer_files, "LlamaForCausalLM")
