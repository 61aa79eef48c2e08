"""The card's evaluation on the shipped kvtier-tiny, on a small grid: both backends agree cell by cell, and a run
cut short resumes, measuring only what it lacks and finding what it measured before."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from kvtier.models.embedded import resolve_model
from kvtier.training import evaluation


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    folder = tmp_path_factory.mktemp("card") / "kvtier-tiny"
    shutil.copytree(resolve_model("kvtier-tiny"), folder, ignore=shutil.ignore_patterns("eval_results.json"))
    validation = np.arange(3, 3000, dtype=np.int32)
    return folder, validation, evaluation.evaluate(folder, validation, trials=2, contexts=(320,), ppl_tokens=512)


def test_every_cell_is_measured_once_and_the_engine_answers_as_transformers_does(measured):
    _, _, results = measured
    cells = {(c["backend"], c["task"], c["haystack"], c["context_tokens"], c["phrasing"]): c for c in results["cells"]}
    assert len(cells) == len(results["cells"]) == len(evaluation.grid(evaluation.BACKENDS, (320,)))
    pairs = [(c, cells["transformers", *key[1:]]) for key, c in cells.items() if key[0] == "engine" and not key[4]]
    assert pairs and all(e["accuracy"] == t["accuracy"] for e, t in pairs), "fp32 both, question fed through decode both"
    assert set(results["perplexity"]) == {"code", "prose", "heldout"} and all(1.0 < v < 8192 for v in results["perplexity"].values())


def test_a_run_cut_short_resumes_with_only_the_missing_cells(measured, monkeypatch):
    folder, validation, results = measured
    path = folder / evaluation.RESULTS_FILE
    kept = json.loads(path.read_text())
    lost = kept["cells"][-3:]
    kept["cells"] = kept["cells"][:-3]
    path.write_text(json.dumps(kept))
    calls = []
    real = {"run_probe": evaluation.run_probe, "run_engine_probe": evaluation.run_engine_probe}
    for name, fn in real.items():
        monkeypatch.setattr(evaluation, name, lambda *a, _fn=fn, _name=name, **kw: calls.append(_name) or _fn(*a, **kw))
    again = evaluation.evaluate(folder, validation, trials=2, contexts=(320,), ppl_tokens=512)
    assert len(calls) == 3
    assert json.loads(path.read_text())["cells"][-3:] == lost, "re-measured cells come out as before"
    assert again["perplexity"] == results["perplexity"]
    monkeypatch.setattr(evaluation, "run_probe", lambda *a, **kw: pytest.fail("nothing is left to measure"))
    monkeypatch.setattr(evaluation, "run_engine_probe", lambda *a, **kw: pytest.fail("nothing is left to measure"))
    assert evaluation.evaluate(folder, validation, trials=2, contexts=(320,), ppl_tokens=512)["cells"] == json.loads(path.read_text())["cells"]
