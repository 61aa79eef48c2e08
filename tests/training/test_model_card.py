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
