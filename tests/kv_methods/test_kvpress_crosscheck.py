"""kvtier's KV methods against kvpress's presses of the same name (H2O: its ``ObservedAttentionPress``, which ranks by
mean attention and keeps no recent window), on the same checkpoint and prompt: the same kept positions per layer and
KV head, and the same next-token logits after compression (fp32, within 1e-4).

kvpress runs in its own environment (it pins an older transformers), made by scripts/setup_kvpress.sh on first use
and driven through tests/kv_methods/kvpress_reference.py in a subprocess. kvpress's knob is ``compression_ratio``,
the fraction removed; kvtier's is ``budget``, the fraction kept.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvtier import LLM, SamplingParams
from kvtier.models.embedded import resolve_model
from tests.engine.test_hf_parity import LogitSpy, prompts_of
from tests.hf_checkpoints import save_hf_checkpoint
from tests.kv_methods.test_eviction import record_kept

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = Path(__file__).with_name("kvpress_reference.py")
# kvtier method -> (kvpress press, how our config maps onto the press's arguments)
PRESSES = {
    "streamingllm": ("StreamingLLMPress", lambda c: {"compression_ratio": 1 - c["budget"], "n_sink": c.get("n_sink", 4)}),
    "snapkv": ("SnapKVPress", lambda c: {"compression_ratio": 1 - c["budget"], "window_size": c.get("window_size", 64),
                                         "kernel_size": c.get("kernel_size", 5)}),
    # H2O's heavy hitters without its recent window, ranked by mean attention: kvpress's press for H2O
    "h2o": ("ObservedAttentionPress", lambda c: {"compression_ratio": 1 - c["budget"]}),
}


@pytest.fixture(scope="module")
def kvpress_python() -> Path:
    subprocess.run([str(ROOT / "scripts" / "setup_kvpress.sh")], check=True, timeout=1200)
    return ROOT / ".venv-kvpress" / "bin" / "python"


@pytest.fixture(scope="module", params=["random-gqa-llama", "kvtier-tiny"])
def model_dir(request, tmp_path_factory, tokenizer_files) -> str:
    if request.param == "kvtier-tiny":
        return str(resolve_model("kvtier-tiny"))
    return str(save_hf_checkpoint(tmp_path_factory.mktemp("llama"), tokenizer_files, "LlamaForCausalLM", num_key_value_heads=2))


def kvpress_answer(python: Path, model: str, press: str, kwargs: dict, prompt: list[int], nxt: int) -> dict:
    req = {"model": model, "press": press, "kwargs": kwargs, "prompt": prompt, "next": nxt}
    r = subprocess.run([str(python), str(REFERENCE)], input=json.dumps(req), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


@pytest.mark.parametrize("method, config", [
    ("streamingllm", {"budget": 0.25}),
    ("streamingllm", {"budget": 0.5, "n_sink": 2}),
    ("snapkv", {"budget": 0.25, "window_size": 16}),
    ("snapkv", {"budget": 0.5, "window_size": 32, "kernel_size": 3}),
    ("h2o", {"budget": 0.25, "recent_fraction": 0.0, "normalize": True}),
    ("h2o", {"budget": 0.5, "recent_fraction": 0.0, "normalize": True}),
])
def test_kept_positions_and_logits_match_kvpress(kvpress_python, model_dir, method, config):
    llm = LLM(model_dir, dtype="float32", kv_cache_memory=1 << 24, kv_method=method, kv_method_config=config)
    vocab = llm.engine.model_config.vocab_size
    prompt = prompts_of([96], min(vocab, 512), seed=21)[0]
    spy, kept = LogitSpy(llm), record_kept(llm)
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True), use_tqdm=False)[0]
    (logits,) = spy.by_seq.values()
    press, to_kwargs = PRESSES[method]
    ref = kvpress_answer(kvpress_python, model_dir, press, to_kwargs(config), prompt, out.outputs[0].token_ids[0])
    assert kept[0].tolist() == ref["kept"]
    assert (logits[1] - torch.tensor(ref["logits"])).abs().max().item() <= 1e-4


def test_the_reference_runs_in_its_own_environment(kvpress_python):
    """kvpress stays out of kvtier's environment: it is importable only in .venv-kvpress."""
    assert subprocess.run([sys.executable, "-c", "import kvpress"], capture_output=True).returncode != 0
    assert subprocess.run([str(kvpress_python), "-c", "import kvpress"], capture_output=True).returncode == 0
