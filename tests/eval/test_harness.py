"""``kvtier eval``'s grid on the shipped kvtier-tiny: the full cache beside StreamingLLM, whose misses must be exactly
where it evicted the needle; and the arguments it refuses before loading anything."""

from __future__ import annotations

import pytest

from kvtier.errors import InvalidArgumentError
from kvtier.eval.harness import FULL, markdown_table, run_eval


def test_streamingllm_fails_where_it_evicted_the_needle_and_nowhere_else():
    """512-token passkey haystacks at depths 0 .. 1, StreamingLLM keeping 4 sink tokens and the last 25%: a needle in
    the first half is gone (the model cannot answer), one at the very end is kept (it answers as the full cache does)."""
    result = run_eval("kvtier-tiny", "streamingllm", None, [0.25], ["passkey"], [512], trials=10, sample_seed=3, dtype="float32",
                      kv_cache_memory=1 << 26)
    full, kept = ({c["method"]: c for c in result["cells"]}[m] for m in (FULL, "streamingllm @ 0.25"))
    assert full["accuracy"] == 1.0, full
    assert all(acc == 0.0 for depth, acc in kept["by_depth"].items() if depth <= 0.5), kept
    assert kept["by_depth"][1.0] == 1.0, kept
    table = markdown_table(result)
    assert "| passkey | 512 | 100% | " in table and "streamingllm @ 0.25" in table


def test_the_query_aware_protocol_prefills_the_question_with_the_haystack():
    """With the question in the prompt the full cache answers as it does with the question through decode, and a budget
    that covers the prompt changes nothing; only the protocol recorded differs."""
    kw = dict(tasks=["passkey"], contexts=[256], trials=4, dtype="float32", kv_cache_memory=1 << 26)
    aware = run_eval("kvtier-tiny", "snapkv", None, [1.0], protocol="query-aware", **kw)
    agnostic = run_eval("kvtier-tiny", **kw)
    assert [c["accuracy"] for c in aware["cells"]] == [1.0, 1.0] and agnostic["cells"][0]["accuracy"] == 1.0
    assert (aware["protocol"], agnostic["protocol"]) == ("query-aware", "query-agnostic")
    assert "query-aware" in markdown_table(aware)


def test_rows_where_the_full_cache_fails_are_marked():
    result = {"model": "m", "haystack": "noise", "protocol": "query-agnostic", "trials": 2, "sample_seed": 0, "machine": "x", "cells": [
        {"method": FULL, "task": "passkey", "context_tokens": 512, "accuracy": 0.4},
        {"method": "streamingllm @ 0.5", "task": "passkey", "context_tokens": 512, "accuracy": 0.5}]}
    table = markdown_table(result)
    assert "| passkey * | 512 | 40% | 50% |" in table and "below 50%" in table


@pytest.mark.parametrize("kw, field", [
    (dict(kv_method="streamingllm", budgets=[0]), "budget"),
    (dict(kv_method="streamingllm", budgets=[1.5]), "budget"),
    (dict(kv_method="streamingllm", budgets=[0.5, -2]), "budget"),
    (dict(kv_method="none", budgets=[0.5]), "budget"),
    (dict(kv_method="snapkvv"), "kv_method"),
    (dict(tasks=["needle"]), "task"),
    (dict(contexts=[10]), "context"),
    (dict(contexts=[100_000]), "context"),
    (dict(trials=0), "trials"),
    (dict(haystack="poetry"), "haystack"),
    (dict(protocol="question-first"), "protocol"),
])
def test_bad_arguments_fail_at_start_naming_the_flag(kw, field):
    with pytest.raises(InvalidArgumentError) as e:
        run_eval("kvtier-tiny", **{"kv_method": "none", **kw}, kv_cache_memory=1 << 24)
    assert e.value.field == field
