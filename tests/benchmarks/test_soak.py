"""The one-minute soak of benchmarks/soak.py, in the suite: concurrent clients (streaming or not, completions
and chats, n up to 3, stop strings, seeds, a third of the streams dropped mid-way) against a 24-block KV pool.
Nothing may fail or differ from the same request sent alone, the server must end idle with every block back
and no traceback in its log. Memory is left to the long run (a minute has no steady state to judge)."""

from __future__ import annotations

import argparse

import pytest
from soak import add_soak_args, catalogue, check_args, run_soak


def soak_args(*flags: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_soak_args(p)
    return p.parse_args(list(flags))


def test_one_minute_soak_loses_nothing():
    r = run_soak(soak_args("--duration", "60", "--clients", "16", "--specs", "24"))
    assert r["failures"] == [], (r["failures"], r["error_examples"])
    assert r["served"] > 100 and r["streamed_whole"] > 20 and r["dropped"] > 10, r
    assert r["preemptions"] > 10, "the pool must be small enough to preempt"
    assert r["server_5xx"] == 0 and r["tracebacks"] == 0 and r["kv_blocks_back"] and r["idle_at_end"] and r["greedy_unchanged"]
    assert len(r["rss_mib_trace"]) >= 10


def test_catalogue_is_seeded_and_every_request_is_reproducible():
    a, b = catalogue(40, 3), catalogue(40, 3)
    assert [(s.endpoint, s.body) for s in a] == [(s.endpoint, s.body) for s in b]
    for s in a:
        assert s.body["temperature"] == 0.0 or s.body["seed"] is not None  # so its answer is fixed whatever else runs
        assert s.body["n"] == 1 or s.body["temperature"] > 0


@pytest.mark.parametrize("flag", ["--duration", "--clients", "--kv-cache-tokens"])
def test_bad_arguments_are_refused_by_name(flag):
    with pytest.raises(SystemExit, match=flag):
        check_args(soak_args(flag, "0"))
