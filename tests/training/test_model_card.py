"""The model card's syntax verdict on the fibonacci continuation, on hand-worked cases."""

import pytest

from kvtier.training.model_card import python_syntax


@pytest.mark.parametrize("code, verdict", [
    ("def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n -", "incomplete"),  # cut off mid-call
    ('def fibonacci(n):\n    """Return the n-th\n    Fibonacci', "incomplete"),  # inside a docstring
    ("def fibonacci(n):\n    return n\n", "complete"),
    ("def fibonacci(n):\n    x = (1,\n    y = 2", "syntax error: '(' was never closed"),  # no continuation fixes `(1, y = 2`
    ("def fibonacci(n):\n    return n\n  return n", "syntax error: unindent does not match any outer indentation level"),
    ("def fibonacci(n):\n    return )", "syntax error: unmatched ')'"),
])
def test_python_syntax_tells_a_cut_off_program_from_an_invalid_one(code, verdict):
    assert python_syntax(code) == verdict


def test_the_retrieval_tables_set_the_engine_figure_in_bold_beside_transformers_and_mark_what_is_not_measured():
    from kvtier.training.model_card import depth_table, phrasing_table, retrieval_tables

    cells = [{"backend": b, "task": "passkey", "haystack": h, "context_tokens": n, "phrasing": "", "trials": 10,
              "accuracy": acc, "by_depth": {"0.0": acc, "1.0": 1.0}}
             for b, h, n, acc in [("engine", "noise", 512, 0.9), ("transformers", "noise", 512, 0.8), ("engine", "code", 2048, 0.5)]]
    cells.append({"backend": "engine", "task": "passkey", "haystack": "heldout", "context_tokens": 2048, "phrasing": "access-code", "trials": 10,
                  "accuracy": 0.3, "by_depth": {}})
    results = {"held_out_context": 2048, "contexts": [512, 2048], "backends": ["engine", "transformers"], "cells": cells}
    tables = retrieval_tables(results)
    assert "| noise | **90%** / 80% | **-** / - |" in tables
    assert "| code | **-** / - | **50%** / - |" in tables
    assert "| passkey | access-code | - | - | - | - | 30% |" in phrasing_table(results)
    assert depth_table(results, "passkey").splitlines()[2:] == ["| code | 50% | 100% |"], "the depth table is the first backend's 2K column"


def test_the_grid_measures_the_engines_2k_passkey_and_multikey_then_held_out_phrasings_first_and_each_cell_once():
    from kvtier.eval.haystacks import HAYSTACKS
    from kvtier.eval.retrieval import TASKS
    from kvtier.training.evaluation import CONTEXTS, grid

    cells = grid(("engine", "transformers"), CONTEXTS)
    assert len(cells) == len(set(cells)) == 2 * len(TASKS) * len(HAYSTACKS) * len(CONTEXTS) + 4 * len(HAYSTACKS)
    head = cells[:2 * len(HAYSTACKS)]
    assert {(c.backend, c.context_tokens, c.phrasing) for c in head} == {("engine", 2048, "")}
    assert {c.task for c in head} == {"passkey", "multikey"}
    held = cells[len(head):len(head) + 4 * len(HAYSTACKS)]
    assert {(c.backend, c.context_tokens) for c in held} == {("engine", 2048)} and {c.phrasing for c in held} == {"access-code", "secret-number"}
    assert all(c.backend == "engine" for c in cells[:len(cells) // 2 + 8]) and cells[-1].backend == "transformers"
    assert not [c for c in cells if c.backend == "transformers" and c.phrasing], "held-out phrasings: the engine's figures only"
