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


def test_the_engine_section_sets_each_engine_figure_beside_transformers_and_marks_what_it_cannot_run():
    from kvtier.training.model_card import TASKS, engine_section

    def cells(contexts, accuracy):
        return [{"task": t, "context_tokens": n, "trials": 10, "accuracy": accuracy(t, n), "by_depth": {}} for t in TASKS for n in contexts]

    results = {"retrieval": cells((512, 4096), lambda t, n: 0.9 if n == 512 else 0.5),
               "engine_retrieval": cells((512,), lambda t, n: 0.8), "engine_note": "Measured here."}
    section = engine_section(results)
    assert "| passkey | 90% / **80%** | 50% / - |" in section
    assert "the 4096-token prompts" in section and section.rstrip().endswith("<!-- /engine-retrieval -->")
    assert engine_section({"retrieval": results["retrieval"]}) == "", "no engine figures, no section"
