"""benchmarks/serving.py against the real server: it counts every request and token exactly, sends on the
Poisson schedule it claims and within its concurrency cap, its latencies are consistent, and errors and
overruns are counted, not fatal."""

from __future__ import annotations

import argparse
import asyncio
import json
import math

import numpy as np
import pytest
from server_process import start_server, stop
from serving import add_serving_args, check_args, main, run_benchmark, send_offsets, workload_for
from workload import Request, add_workload_args, make_workload

from kvtier.models.checkpoint_builder import build_random_checkpoint

VOCAB = 2048
N = 16
WORKLOAD = ["--prompt-median", "12", "--output-median", "8", "--max-len", "32", "--seed", "5", "--vocab-size", str(VOCAB)]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = build_random_checkpoint(tmp_path_factory.mktemp("bench"), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, intermediate_size=128, vocab_size=VOCAB, tokenizer_vocab_size=VOCAB)
    proc, url = start_server(str(model), "--served-model-name", "tiny", "--kv-cache-memory", str(1 << 24))
    yield url
    assert stop(proc) == 0


def workload(*flags: str) -> list[Request]:
    p = argparse.ArgumentParser()
    add_serving_args(p)
    return workload_for(p.parse_args([*WORKLOAD, *flags]))


def test_workload_is_the_lognormal_draw_behind_round_robin_prefixes():
    reqs = workload("--num-prompts", "6", "--shared-prefix-len", "8", "--num-prefix-groups", "2")
    p = argparse.ArgumentParser()
    add_workload_args(p)
    plain = make_workload(p.parse_args(["--num-prompts", "6", *WORKLOAD[:-2]]), VOCAB)
    assert [r.prompt_token_ids[8:] for r in reqs] == [r.prompt_token_ids for r in plain]
    assert [r.output_len for r in reqs] == [r.output_len for r in plain]
    heads = [tuple(r.prompt_token_ids[:8]) for r in reqs]
    assert heads[0] == heads[2] == heads[4] != heads[1] == heads[3] == heads[5]


@pytest.mark.parametrize("rate, cap", [(math.inf, None), (20.0, None), (math.inf, 2)])
def test_every_request_and_token_is_counted(server, rate, cap):
    reqs = workload("--num-prompts", str(N), "--shared-prefix-len", "16", "--num-prefix-groups", "2")
    summary, results = asyncio.run(run_benchmark(server, None, reqs, rate, cap, seed=3, timeout=120, progress=False))
    assert summary["completed"] == N and summary["failed"] == 0, summary["errors"]
    assert summary["output_tokens"] == sum(r.output_len for r in reqs)  # ignore_eos: each runs to its drawn length
    assert summary["prompt_tokens"] == sum(len(r.prompt_token_ids) for r in reqs)  # the server's count, prefix included
    for r, req in zip(results, reqs):
        assert r.output_tokens == req.output_len
        assert 0 < r.ttft <= r.e2e
        assert len(r.itl) == req.output_len - 1  # the server streams one chunk per decode step
    for k in ("ttft", "tpot", "itl", "e2e"):
        assert 0 < summary[k]["median_ms"] <= summary[k]["p99_ms"]
    assert summary["request_throughput"] == pytest.approx(N / summary["duration_s"])
    sent = np.array([r.sent for r in results])
    late = sent - np.array(send_offsets(N, rate, seed=3))
    assert late.min() >= 0
    if cap is None:
        assert late.max() < 0.5  # on the Poisson schedule
    else:  # the cap holds requests back: never more than ``cap`` in flight, counted at each send
        ends = [r.sent + r.e2e for r in results]
        assert max(sum(s <= t < e for s, e in zip(sent, ends)) for t in sent) == cap


def test_poisson_offsets_match_an_independent_draw():
    offsets = send_offsets(2000, 4.0, seed=9)
    assert np.allclose(offsets, np.cumsum(np.random.default_rng(9).exponential(0.25, 2000)))
    assert np.mean(np.diff(offsets)) == pytest.approx(0.25, rel=0.1)
    assert send_offsets(3, math.inf, seed=9) == [0.0, 0.0, 0.0]


def test_errors_and_overruns_are_counted_not_fatal(server):
    summary, _ = asyncio.run(run_benchmark(server, "no-such-model", workload("--num-prompts", "3"), progress=False, timeout=60))
    assert summary["completed"] == 0 and summary["failed"] == 3
    assert all(e.startswith("HTTP 404") for e in summary["errors"]) and summary["ttft"]["mean_ms"] is None
    summary, _ = asyncio.run(run_benchmark(server, "tiny", [Request([5] * 8, 3000), Request([6] * 8, 2)], timeout=1.0, progress=False))
    assert summary["completed"] == 1 and summary["failed"] == 1 and "--timeout" in summary["errors"][0]


def test_cli_writes_strict_json(server, tmp_path, capsys):
    out = tmp_path / "r.json"
    main(["--base-url", server, "--num-prompts", "4", "--request-rate", "inf", "--label", "smoke", "--json-out", str(out), *WORKLOAD])
    assert "Successful requests:" in capsys.readouterr().out
    record = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert record["label"] == "smoke" and record["completed"] == 4 and record["settings"]["request_rate"] == "inf" and record["machine"]


@pytest.mark.parametrize("url", ["http://10.0.0.1:8000", "http://example.com", "http://192.168.1.5", "http://localhost.example.com", "127.0.0.1:8000"])
def test_only_loopback_urls(url, capsys):
    with pytest.raises(ValueError, match="--base-url"):
        check_args(url, math.inf, None)
    with pytest.raises(SystemExit):
        main(["--base-url", url])
    assert "--base-url" in capsys.readouterr().err
    for ok in ("http://127.0.0.1:8000", "http://127.3.2.1", "http://localhost:1", "http://[::1]:8000"):
        check_args(ok, math.inf, None)
