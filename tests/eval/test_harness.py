"""``kvtier eval``'s grid on the shipped kvtier-tiny: the full cache beside StreamingLLM, whose misses must be exactly
where it evicted the needle; and the arguments it refuses before loading anything."""

from __future__ import annotations

import math

import pytest
import torch

from kvtier.errors import InvalidArgumentError
from kvtier.eval.agreement import agreement
from kvtier.eval.harness import FULL, check_eval_args, markdown_table, run_eval, run_name


def test_streamingllm_fails_where_it_evicted_the_needle_and_nowhere_else():
    """512-token passkey haystacks at depths 0 .. 1, StreamingLLM keeping 4 sink tokens and the last 25%: a needle in
    the first half is gone (the model cannot answer), one at the very end is kept (it answers as the full cache does)."""
    result = run_eval("kvtier-tiny", "streamingllm", None, [0.25], ["passkey"], [512], trials=10, sample_seed=3, dtype="float32",
                      kv_cache_memory=1 << 26)
    full, kept = ({c["method"]: c for c in result["cells"]}[m] for m in (FULL, "streamingllm @ 0.25"))
    assert full["accuracy"] == 1.0, full
    assert all(acc == 0.0 for depth, acc in kept["by_depth"].items() if depth <= 0.5), kept
    assert kept["by_depth"][1.0] == 1.0, kept
    assert full["lost"] is None and len(kept["scores"]) == 10
    assert kept["lost"] == 10 - sum(kept["scores"]) >= 5, "the full cache answered all: every miss is one it lost"
    table = markdown_table(result)
    assert "| passkey | 512 | 100% | " in table and "streamingllm @ 0.25" in table and f"(-{kept['lost']})" in table


def test_the_query_aware_protocol_prefills_the_question_with_the_haystack():
    """With the question in the prompt the full cache answers as it does with the question through decode, and a budget
    that covers the prompt changes nothing; only the protocol recorded differs."""
    kw = dict(tasks=["passkey"], contexts=[256], trials=4, dtype="float32", kv_cache_memory=1 << 26)
    aware = run_eval("kvtier-tiny", "snapkv", None, [1.0], protocol="query-aware", **kw)
    agnostic = run_eval("kvtier-tiny", **kw)
    assert [c["accuracy"] for c in aware["cells"]] == [1.0, 1.0] and agnostic["cells"][0]["accuracy"] == 1.0
    assert (aware["protocol"], agnostic["protocol"]) == ("query-aware", "query-agnostic")
    assert "query-aware" in markdown_table(aware)


def test_commonwords_and_perplexity_through_the_engine():
    """Both eval-only tasks run in the grid (the full cache's perplexity is checked against transformers in
    test_cache_perplexity.py): keeping a quarter of each window makes its continuation harder to predict; common words
    has no depths and a score in [0, 1]."""
    result = run_eval("kvtier-tiny", "streamingllm", None, [0.25], ["commonwords", "perplexity"], [512], trials=2, dtype="float32",
                      kv_cache_memory=1 << 26)
    cells = {(c["method"], c["task"]): c for c in result["cells"]}
    assert len(cells) == 4
    for m in (FULL, "streamingllm @ 0.25"):
        cwe = cells[(m, "commonwords")]
        assert cwe["by_depth"] == {} and 0.0 <= cwe["accuracy"] <= 1.0 and cwe["perplexity"] is None and cwe["trials"] == 2
    full, quarter = (cells[(m, "perplexity")]["perplexity"] for m in (FULL, "streamingllm @ 0.25"))
    assert 1.0 < full < 8192 and quarter > full * 1.01
    table = markdown_table(result)
    assert f"| perplexity | 512 | ppl {full:.1f} | ppl {quarter:.1f} |" in table and "| commonwords" in table


def test_perplexity_rows_show_perplexity_and_are_never_marked():
    """Perplexity is no score: a full cache whose top-1 is below 50% there does not make the row unjudgeable."""
    result = {"model": "m", "haystack": "noise", "protocol": "query-agnostic", "trials": 2, "sample_seed": 0, "machine": "x", "cells": [
        {"method": FULL, "task": "perplexity", "context_tokens": 512, "accuracy": 0.3, "perplexity": 12.34},
        {"method": "snapkv @ 0.5", "task": "perplexity", "context_tokens": 512, "accuracy": 0.2, "perplexity": 20.0},
        {"method": FULL, "task": "commonwords", "context_tokens": 512, "accuracy": 0.65},
        {"method": "snapkv @ 0.5", "task": "commonwords", "context_tokens": 512, "accuracy": 0.25}]}
    table = markdown_table(result)
    assert "| perplexity | 512 | ppl 12.3 | ppl 20.0 |" in table and "| commonwords | 512 | 65% | 25% |" in table
    assert "*" not in table and "perplexity: exp(mean NLL)" in table


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
    (dict(tasks=["perplexity", "commonword"]), "task"),
    (dict(contexts=[10]), "context"),
    (dict(contexts=[100_000]), "context"),
    (dict(trials=0), "trials"),
    (dict(haystack="poetry"), "haystack"),
    (dict(protocol="question-first"), "protocol"),
    (dict(phrasing="landmark"), "phrasing"),  # passkey's alone: the wording must exist for both needle tasks
])
def test_bad_arguments_fail_at_start_naming_the_flag(kw, field):
    with pytest.raises(InvalidArgumentError) as e:
        run_eval("kvtier-tiny", **{"kv_method": "none", **kw}, kv_cache_memory=1 << 24)
    assert e.value.field == field


def test_agreement_is_kl_and_top1_worked_by_hand():
    """p = (1/2, 1/2) against q = (3/4, 1/4): KL = 1/2 ln(2/3) + 1/2 ln 2 = 0.1438410 nats; same top-1 (token 0). Then a
    position where the top-1 differs: half the positions agree."""
    full = [([0], torch.tensor([[0.0, 0.0]])), ([1], torch.tensor([[0.0, 2.0]]))]
    mine = [([0], torch.tensor([[math.log(3.0), 0.0]])), ([1], torch.tensor([[2.0, 0.0]]))]
    a = agreement(full[:1], mine[:1])
    assert a["top1"] == 1.0 and abs(a["kl"] - (0.5 * math.log(2 / 3) + 0.5 * math.log(2))) < 1e-6
    assert agreement(full, mine)["top1"] == 0.5


def test_agreement_with_the_full_cache_through_the_engine():
    """Along the full cache's greedy continuation of held-out text: a budget covering the prompt agrees everywhere with KL
    0; keeping a quarter moves the distributions (KL > 0)."""
    result = run_eval("kvtier-tiny", "streamingllm", None, [1.0, 0.25], ["agreement"], [256], trials=2, dtype="float32", kv_cache_memory=1 << 26)
    cells = {c["method"]: c for c in result["cells"]}
    assert cells["streamingllm @ 1.0"]["accuracy"] == 1.0 and cells["streamingllm @ 1.0"]["kl"] < 1e-6
    assert cells["streamingllm @ 0.25"]["kl"] > 1e-4
    assert "KL" in markdown_table(result)


def test_the_plot_has_a_panel_per_task_and_context(tmp_path):
    from PIL import Image

    from kvtier.eval.plots import plot_scores

    def cell(method, task, context, acc):
        return {"method": method, "task": task, "context_tokens": context, "accuracy": acc}

    results = [{"cells": [cell(FULL, "passkey", 512, 1.0), cell("snapkv @ 0.25", "passkey", 512, 0.2), cell("snapkv @ 0.5", "passkey", 512, 0.3),
                          cell(FULL, "multikey", 512, 0.9), cell("snapkv @ 0.25", "multikey", 512, 0.1), cell("snapkv @ 0.5", "multikey", 512, 0.4)]},
               {"cells": [cell(FULL, "passkey", 512, 1.0), cell("streamingllm @ 0.25", "passkey", 512, 0.3),
                          cell(FULL, "multikey", 512, 0.9), cell("streamingllm @ 0.25", "multikey", 512, 0.3)]}]
    path = plot_scores(results, tmp_path / "scores.png")
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (int(6.5 * 110), int(2 * 3.2 * 110))  # a row per task, a column per context (legend beside)


def test_perplexity_gets_its_own_axis_in_the_plot(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from kvtier.eval.plots import plot_scores

    drawn: list[Figure] = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: drawn.append(fig))
    cells = [{"method": FULL, "task": "perplexity", "context_tokens": 512, "accuracy": 0.3, "perplexity": 150.0},
             {"method": "snapkv @ 0.5", "task": "perplexity", "context_tokens": 512, "accuracy": 0.2, "perplexity": 180.0},
             {"method": FULL, "task": "commonwords", "context_tokens": 512, "accuracy": 0.6},
             {"method": "snapkv @ 0.5", "task": "commonwords", "context_tokens": 512, "accuracy": 0.3}]
    plot_scores([{"cells": cells}], tmp_path / "scores.png")
    ppl, cwe = drawn[0].axes
    assert ppl.get_ylabel().startswith("perplexity") and ppl.get_ylim()[0] < 150 < 180 < ppl.get_ylim()[1]
    assert ppl.lines[0].get_ydata()[0] == 150.0 and list(ppl.lines[1].get_ydata()) == [180.0]
    assert cwe.get_ylabel() == "accuracy" and cwe.get_ylim() == (-0.02, 1.02)


def test_several_methods_share_one_full_cache_run():
    runs = check_eval_args(["streamingllm", "quest"], None, [0.25, 64], ["passkey"], [512], 2, "noise")
    assert runs == [None, ("streamingllm", {"budget": 0.25}), ("streamingllm", {"budget": 64}), ("quest", {"budget": 0.25}), ("quest", {"budget": 64})]
    with pytest.raises(InvalidArgumentError) as e:
        check_eval_args(["streamingllm", "nope"], None, [0.25], ["passkey"], [512], 2, "noise")
    assert e.value.field == "kv_method"


def test_variants_add_an_ablation_run_per_method_and_budget_named_by_what_they_change():
    runs = check_eval_args("kcache", '{"renormalize": false}', [0.25, 64], ["passkey"], [512], 2, "noise", variants=[{}, '{"dense_layers": 1}'])
    base = {"renormalize": False}
    assert runs == [None, ("kcache", {**base, "budget": 0.25}), ("kcache", {**base, "dense_layers": 1, "budget": 0.25}),
                    ("kcache", {**base, "budget": 64}), ("kcache", {**base, "dense_layers": 1, "budget": 64})]
    assert run_name("kcache", {"budget": 64, "dense_layers": 2, "renormalize": False}, {}) == "kcache (dense_layers=2, renormalize=false) @ 64"
    assert run_name("kcache", {"budget": 64, "dense_layers": 2}, {"dense_layers": 2}) == "kcache @ 64"
    for bad in ('{"budget": 0.5}', "[1]", "{nope"):
        with pytest.raises(InvalidArgumentError) as e:
            check_eval_args("kcache", None, [64], ["passkey"], [512], 2, "noise", variants=[bad])
        assert e.value.field == "variant"
    with pytest.raises(InvalidArgumentError) as e:
        check_eval_args("kcache", None, [64], ["passkey"], [512], 2, "noise", variants=[{"dense_layers": -1}])
    assert e.value.field == "kv_method_config.dense_layers"


def test_a_phrasing_words_the_needle_tasks_only(monkeypatch):
    """``phrasing`` reaches passkey and multi-key samples (held-out wordings: evaluation on text no training document
    used) and not variable tracking, which has only RULER's wording; the table names it."""
    import kvtier.eval.probe as probe

    asked, make = [], probe.make_sample
    monkeypatch.setattr(probe, "make_sample", lambda task, *a, **kw: asked.append((task, kw.get("phrasing"))) or make(task, *a, **kw))
    result = run_eval("kvtier-tiny", tasks=["passkey", "vartrack"], contexts=[256], trials=1, phrasing="secret-number", dtype="float32",
                      kv_cache_memory=1 << 26)
    assert asked == [("passkey", "secret-number"), ("vartrack", None)]
    assert "needles worded 'secret-number'" in markdown_table(result)
