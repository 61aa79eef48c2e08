"""The ``cpu`` backend's C++ decode kernel against the reference decode attention (matmuls over gathered blocks), and
the backend choice: ``auto`` takes it on a CPU, and a KV method acting inside decode attention keeps the reference,
with a log line that says why."""

from __future__ import annotations

import logging
import types

import pytest
import torch

from kvtier import LLM, SamplingParams
from kvtier.attention.cpu import CpuPagedBackend
from kvtier.attention.metadata import DecodeGroup
from kvtier.attention.paged import decode_attention
from kvtier.cache.layer_cache import LayerCache
from kvtier.kv_methods.kcache import KCache, KCacheConfig


@pytest.mark.parametrize("heads, kv_heads, dim, window", [(8, 4, 64, None), (4, 4, 32, None), (6, 1, 48, None), (8, 2, 20, 37)])
def test_kernel_matches_the_reference_decode(heads, kv_heads, dim, window):
    """Random paged cache, rows of different lengths in scattered blocks (padded tables, block 0 as padding), GQA, MHA,
    MQA, a head size that is no multiple of the vector width, a sliding window whose tables start past position 0."""
    g = torch.Generator().manual_seed(heads * dim)
    bs, rows = 16, 9
    lens = torch.randint(1, 140, (rows,), generator=g)
    lens[0] = 1
    starts = torch.zeros(rows, dtype=torch.long) if window is None else ((lens - window).clamp(min=0) // bs) * bs
    width = int(((lens - starts + bs - 1) // bs).max())
    k = torch.randn(kv_heads, (rows * width + 1) * bs, dim, generator=g)
    v = torch.randn(kv_heads, (rows * width + 1) * bs, dim, generator=g)
    tables = (torch.randperm(rows * width, generator=g) + 1).view(rows, width)
    for r in range(rows):  # padding past a row's last block, as the backend's metadata pads
        tables[r, int((lens[r] - starts[r] + bs - 1) // bs):] = 0
    group = DecodeGroup(0, tables.flatten(), lens, lens - 1, bs, window, None if window is None else starts)
    q = torch.randn(rows, heads, dim, generator=g)
    cache = types.SimpleNamespace(k=k, v=v)
    want = decode_attention(q.double(), types.SimpleNamespace(k=k.double(), v=v.double()), group, dim**-0.5)
    got = CpuPagedBackend().decode(q, cache, group, dim**-0.5)
    assert (got.double() - want).abs().max().item() <= 1e-5
    mine_ref = decode_attention(q, cache, group, dim**-0.5)
    assert (mine_ref.double() - want).abs().max().item() <= 1e-5


def test_auto_picks_the_kernel_and_a_decode_method_keeps_the_reference_decode(llama_dir, caplog):
    """A KV method acting inside decode attention keeps the native model (packed linears, fused kernels) and runs every
    decode on the reference path, and says so; its greedy tokens are those of the reference backend."""
    assert LLM(str(llama_dir), kv_cache_memory=1 << 22).engine.attention.decode_kernel
    quest = {"kv_cache_memory": 1 << 22, "kv_method": "quest", "kv_method_config": {"budget": 32}}
    with caplog.at_level(logging.INFO, logger="kvtier.attention.registry"):
        llm = LLM(str(llama_dir), attention_backend="cpu", **quest)
    backend = llm.engine.attention
    assert backend.name == "cpu" and not backend.decode_kernel and backend.decode_groups_by_length
    assert "'quest' acts inside decode attention, so decode attention runs on the reference path" in caplog.text
    backend.kernels = types.SimpleNamespace(paged_decode=lambda *a: pytest.fail("the decode kernel ran beside a decode-hook method"))
    prompt, params = {"prompt_token_ids": list(range(5, 90))}, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    tokens = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
    reference = LLM(str(llama_dir), attention_backend="paged", **quest).generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
    assert tokens == reference


def test_without_a_compiler_the_engine_runs_on_the_reference_backend_and_says_why(llama_dir, tmp_path):
    """A fresh machine with no C++ compiler: the first engine tries to build the kernels, fails, logs why and serves on
    ``paged`` (in a subprocess: a process builds or loads the kernels once)."""
    import os
    import subprocess
    import sys

    code = "\n".join([
        "from kvtier import LLM, SamplingParams",
        f"llm = LLM({str(llama_dir)!r}, kv_cache_memory=1 << 22)",
        "print('backend', llm.engine.attention.name)",
        "out = llm.generate({'prompt_token_ids': [5, 6, 7]}, SamplingParams(max_tokens=3), use_tqdm=False)[0]",
        "print('tokens', len(out.outputs[0].token_ids))",
    ])
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "KVTIER_EXTENSIONS_DIR": str(tmp_path / "ext")}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "backend paged" in run.stdout and "tokens 3" in run.stdout
    assert "'cpu' cannot serve here (the C++ kernels did not build" in run.stderr and "reference backend 'paged'" in run.stderr


@pytest.mark.parametrize("config", [{"top_n": 5}, {"top_n": 0.25, "renormalize": False}, {"top_n": 7, "per_kv_head": True},
                                    {"top_n": 3, "per_kv_head": True, "renormalize": False}, {"top_n": 1000},
                                    {"top_n": 6, "residual": True}, {"top_n": 0.1, "per_kv_head": True, "residual": True}])
def test_kernel_does_kcaches_top_n_read_as_the_reference(config):
    """KCache's read in the kernel (every key scored, only the Top-N V rows read: per query head or per KV head,
    renormalised, truncated or with the residual's block means, N above the context too) against the reference path's
    ``read_values`` on the same cache."""
    g = torch.Generator().manual_seed(len(str(config)))
    heads, kv_heads, dim, bs, rows = 8, 2, 24, 16, 6
    lens = torch.randint(2, 120, (rows,), generator=g)
    width = int(((lens + bs - 1) // bs).max())
    k = torch.randn(kv_heads, (rows * width + 1) * bs, dim, generator=g)
    v = torch.randn(kv_heads, (rows * width + 1) * bs, dim, generator=g)
    tables = (torch.randperm(rows * width, generator=g) + 1).view(rows, width)
    for r in range(rows):
        tables[r, int((lens[r] + bs - 1) // bs):] = 0
    group = DecodeGroup(0, tables.flatten(), lens, lens - 1, bs, None, None)
    q = torch.randn(rows, heads, dim, generator=g) * 2
    sums = torch.zeros(kv_heads, rows * width + 1, dim)  # each block's V sum over the tokens its row wrote
    for r in range(rows):
        for j in range(int((lens[r] + bs - 1) // bs)):
            block = int(tables[r, j])
            sums[:, block] = v[:, block * bs:block * bs + min(bs, int(lens[r]) - j * bs)].sum(1)
    cache = LayerCache(k, v, value_sums=sums)
    method = KCache(KCacheConfig(**config))
    want = decode_attention(q, cache, group, dim**-0.5, hooks=method)
    got = CpuPagedBackend().decode(q, cache, group, dim**-0.5, hooks=method)
    assert (got - want).abs().max().item() <= 1e-5
    if config["top_n"] < 100:  # the read really is sparse: all the values differ
        assert (got - CpuPagedBackend().decode(q, cache, group, dim**-0.5)).abs().max().item() > 1e-3
