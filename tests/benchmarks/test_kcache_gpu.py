"""benchmarks/kcache_gpu.py's decode-step breakdown runs its code paths on a CPU at toy sizes, and every KCache variant
it times computes what the rows read from device memory give."""

from __future__ import annotations

import json

import torch
from kcache_gpu import Layer, main

from kvtier.kv_methods.kcache import KCache, KCacheConfig


def test_the_parts_smoke_run_writes_every_variant(tmp_path):
    out = tmp_path / "parts.json"
    assert main(["--device", "cpu", "--sections", "parts", "--smoke", "--reps", "1", "--warmup", "0", "--json-out", str(out),
                 "--markdown-out", str(tmp_path / "parts.md")]) == 0
    rows = json.loads(out.read_text())["parts"]["rows"]
    assert {(r["shape"], r["top_n"]) for r in rows} == {(s, n) for s in ("kvtier-tiny", "llama-7b-like") for n in (64, 256)}
    for r in rows:
        for key in ("kcache_engine", "kcache_sync", "kcache_pinned"):
            assert r[f"{key}_step_max_abs_err"] < 1e-5, key
        assert r["engine_max_abs_err"] < 1e-5 and r["gather_pinned_max_abs_err"] == 0.0
    assert "Whole step of one layer" in (tmp_path / "parts.md").read_text()


def test_the_benchmark_selects_as_kcache_reads():
    layer = Layer(8, 4, 16, torch.float32, 128, 3, torch.device("cpu"), seed=1)
    method = KCache(KCacheConfig(top_n=8))
    probs = layer.softmax(layer.scores())
    p, picked = layer.select(method, probs)
    mine = layer.weighted_sum(p, layer.gather_pinned(picked))
    engine = method.read_values(probs, layer.cache, layer.slots, layer.context_lens)
    torch.testing.assert_close(mine, engine, rtol=0, atol=0)
