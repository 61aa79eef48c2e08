"""The ``kvtier`` command line, run as a user would: a subprocess on a real checkpoint folder."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest


def kvtier(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvtier.entrypoints.cli", *args], capture_output=True, text=True, input=stdin, timeout=300)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "tiny"
    r = kvtier("make-checkpoint", str(path), "--hidden-size", "64", "--num-hidden-layers", "2", "--num-attention-heads", "4",
               "--num-key-value-heads", "2", "--intermediate-size", "128", "--vocab-size", "4096")
    assert r.returncode == 0, r.stderr
    return path


def test_generate_prints_one_json_line_per_completion(model_dir):
    r = kvtier("generate", "--model", str(model_dir), "--prompt", "def f(x):", "--prompt", "import os", "--max-tokens", "5", "--n", "2",
               "--sampling-seed", "1", "--temperature", "1.0", "--json", "--kv-cache-memory", str(1 << 22))
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert [(x["prompt"], x["index"]) for x in lines] == [("def f(x):", 0), ("def f(x):", 1), ("import os", 0), ("import os", 1)]
    assert all(x["finish_reason"] in ("length", "stop") for x in lines)


def test_info_reports_the_memory_plan(model_dir):
    r = kvtier("info", "--model", str(model_dir), "--kv-cache-memory", str(1 << 20), "--block-size", "16", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    per_token = 2 * 2 * 2 * 16 * 4  # K+V, layers, kv heads, head_dim, fp32
    assert info["architecture"] == "LlamaForCausalLM"
    assert info["memory_plan"]["kv_bytes_per_token"] == per_token
    [group] = info["memory_plan"]["groups"]
    assert group["kind"] == "full attention" and group["layers"] == [0, 1] and group["share"] == 1.0
    assert group["num_blocks"] == (1 << 20) // (per_token * 16)
    assert info["kv_cache"]["kv_blocks_free"] == group["num_blocks"]
    emb, layer = 4096 * 64, 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128 + 2 * 64
    assert info["parameters"] == 2 * emb + 2 * layer + 64


def test_bad_flag_value_is_a_clear_error(model_dir):
    r = kvtier("generate", "--model", str(model_dir), "--prompt", "x", "--top-p", "1.5")
    assert r.returncode == 2 and "top_p" in r.stderr and "(0, 1]" in r.stderr
    r = kvtier("generate", "--model", str(model_dir / "missing"), "--prompt", "x")
    assert r.returncode == 2 and "missing" in r.stderr
    r = kvtier("generate", "--model", str(model_dir), "--prompt", "x", "--attention-backend", "flash")
    assert r.returncode == 2 and "attention_backend: must be one of auto, cpu, paged" in r.stderr


def test_a_kv_method_is_chosen_by_flags_and_shown_by_info(model_dir):
    r = kvtier("info", "--model", str(model_dir), "--kv-method", "streamingllm", "--kv-method-config", '{"budget": 0.25, "n_sink": 2}', "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["kv_method"] == {"name": "streamingllm", "budget": 0.25, "n_sink": 2}
    r = kvtier("generate", "--model", str(model_dir), "--prompt", "def f(x): return x\n" * 8, "--max-tokens", "4", "--kv-method", "streamingllm",
               "--kv-method-config", '{"budget": 16}', "--kv-cache-memory", str(1 << 22))
    assert r.returncode == 0, r.stderr
    r = kvtier("generate", "--model", str(model_dir), "--prompt", "x", "--kv-method", "streamingllm", "--kv-method-config", '{"budget": 2.5}')
    assert r.returncode == 2 and "kv_method_config.budget" in r.stderr and "(0, 1]" in r.stderr
    r = kvtier("generate", "--model", str(model_dir), "--prompt", "x", "--kv-method", "h3o")
    assert r.returncode == 2 and "kv_method: must be one of none, streamingllm" in r.stderr


def test_eval_prints_the_full_cache_beside_the_method_and_refuses_bad_flags(model_dir, tmp_path):
    out = tmp_path / "eval.json"
    r = kvtier("eval", "--model", str(model_dir), "--kv-method", "streamingllm", "--budget", "0.5", "64", "--context", "256", "--trials", "2",
               "--kv-cache-memory", str(1 << 22), "--json-out", str(out))
    assert r.returncode == 0, r.stderr
    assert "| task | context | full cache | streamingllm @ 0.5 | streamingllm @ 64 |" in r.stdout
    assert [c["method"] for c in json.loads(out.read_text())["cells"]] == ["full cache", "streamingllm @ 0.5", "streamingllm @ 64"]
    for flags, message in ((["--kv-method", "streamingllm", "--budget", "0"], "budget: must be a fraction"),
                           (["--kv-method", "streamingllm", "--budget", "1.5"], "budget: must be a fraction"),
                           (["--budget", "0.5"], "budget: needs a --kv-method"),
                           (["--kv-method", "streamingllm", "--kv-method-config", '{"sinks": 2}'], "kv_method_config: streamingllm takes"),
                           (["--task", "needle"], "--task: invalid choice")):
        r = kvtier("eval", "--model", str(model_dir), *flags)
        assert r.returncode == 2 and message in r.stderr, (flags, r.stderr)


def test_eval_takes_the_eval_only_tasks(model_dir):
    r = kvtier("eval", "--model", str(model_dir), "--task", "perplexity", "--context", "128", "--trials", "1", "--kv-cache-memory", str(1 << 22))
    assert r.returncode == 0, r.stderr
    assert re.search(r"^\| perplexity \| 128 \| ppl \d+\.\d \|$", r.stdout, re.M), r.stdout


def test_chat_reads_turns_from_stdin(model_dir):
    r = kvtier("chat", "--model", str(model_dir), "--max-tokens", "3", "--kv-cache-memory", str(1 << 22), stdin="hello\nhow are you\n")
    assert r.returncode == 0, r.stderr
    assert len([line for line in r.stdout.splitlines() if line.startswith("> ")]) >= 2


def test_info_reads_as_a_summary_by_default(model_dir):
    r = kvtier("info", "--model", str(model_dir), "--kv-cache-memory", str(1 << 20), "--block-size", "16")
    assert r.returncode == 0, r.stderr
    per_token = 2 * 2 * 2 * 16 * 4  # K+V, layers, kv heads, head_dim, fp32
    blocks = (1 << 20) // (per_token * 16)
    rows = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in r.stdout.splitlines() if not line.startswith("("))
    assert rows["architecture"].startswith("LlamaForCausalLM")
    assert rows["KV budget"] == "1.0 MiB, split among 1 layer group(s):"
    assert rows["full attention"] == f"2 layers, 100% = 1.0 MiB: {blocks} blocks of 8.0 KiB, {blocks * 16} tokens; 0 swap blocks"
    assert per_token == 512 and rows["KV per token"] == "512 B in blocks of 16 tokens"
    assert rows["blocks now"] == f"{blocks} free, 0 cached, 0 used"


def test_info_under_kcache_shows_k_on_the_device_and_v_in_the_host_tier(model_dir):
    """``--kv-method kcache``: a token takes half the device bytes, so the same budget holds twice the blocks, and V has
    its own budget (``--kv-host-memory``); a host tier too small for one sequence fails at start naming the flag."""
    args = ["info", "--model", str(model_dir), "--kv-cache-memory", str(1 << 20), "--kv-method", "kcache", "--max-model-len", "512"]
    r = kvtier(*args, "--kv-host-memory", str(1 << 19))
    assert r.returncode == 0, r.stderr
    rows = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in r.stdout.splitlines() if not line.startswith("("))
    blocks = (1 << 19) // (256 * 16)  # the host tier binds: V of 2 layers x 2 KV heads x head_dim 16, fp32, 16 tokens a block
    assert rows["KV per token"] == "256 B in blocks of 16 tokens"
    assert rows["full attention, V in the host tier"] == (f"2 layers, 100% = 1.0 MiB: {blocks} blocks of 4.0 KiB, {blocks * 16} tokens; "
                                                          "V in 512.0 KiB of host tier; 0 swap blocks")
    small = kvtier(*args, "--kv-host-memory", str(4096 * 10))
    assert small.returncode != 0 and "kv_host_memory" in small.stderr


def test_python_dash_m_kvtier_is_the_kvtier_command(model_dir):
    args = ["generate", "--model", str(model_dir), "--prompt", "def f(x):", "--max-tokens", "4", "--kv-cache-memory", str(1 << 22)]
    via_module = subprocess.run([sys.executable, "-m", "kvtier", *args], capture_output=True, text=True, timeout=300)
    assert via_module.returncode == 0, via_module.stderr
    assert via_module.stdout == kvtier(*args).stdout
    bad = subprocess.run([sys.executable, "-m", "kvtier", "generate", "--model", str(model_dir), "--top-p", "2"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "top_p" in bad.stderr


def test_info_on_a_hybrid_shows_its_state_slots_and_its_prefix_cache(tmp_path, tokenizer_files):
    from tests.hf_checkpoints import NEMOTRON_H, save_hf_checkpoint

    path = save_hf_checkpoint(tmp_path / "nemotron-h", tokenizer_files, "NemotronHForCausalLM", **NEMOTRON_H)
    r = kvtier("info", "--model", str(path), "--kv-cache-memory", str(1 << 20), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    slot = 3 * (192 * 3 + 4 * 32 * 16) * 4  # Mamba2 layers 0, 3, 5: conv state (conv_dim x K-1) + SSM state (heads x head_dim x state), fp32
    assert info["mamba_layers"] == [0, 3, 5] and info["prefix_cache_policy"] == "marconi"
    assert info["memory_plan"]["kv_bytes_per_token"] == 2 * 1 * 2 * 16 * 4  # K+V of the one attention layer (layer 2 is an MLP)
    state, attention = info["memory_plan"]["groups"]
    assert (state["kind"], state["layers"], state["bytes_per_block"], state["max_cached_tokens"]) == ("mamba2 state", [0, 3, 5], slot, None)
    assert attention["layers"] == [1]
    kv = info["kv_cache"]
    assert (kv["mamba_slots_total"], kv["mamba_slots_used"], kv["mamba_bytes_per_slot"]) == (state["num_blocks"], 0, slot)
    text = kvtier("info", "--model", str(path), "--kv-cache-memory", str(1 << 20)).stdout
    assert "prefix caching     on, marconi: a radix tree of checkpoints" in text
    assert "attention          1 of 6 layers, 4 heads, 2 KV heads of dimension 16" in text, "NemotronH's MLP blocks do not attend"
    assert f"slots now          {state['num_blocks']} free, 0 cached, 0 used" in text
