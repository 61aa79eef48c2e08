"""``kvtier train-tiny``'s arguments: bad ones are refused by name before any work, and the card's command is the one
that trains and evaluates everything (no --eval-only, no budget)."""

from __future__ import annotations

import argparse

import pytest

from kvtier.errors import InvalidArgumentError
from kvtier.training.train_tiny import _without, add_train_tiny_args, run_train_tiny


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_train_tiny_args(p)
    return p.parse_args(list(argv))


@pytest.mark.parametrize("argv, field", [(("--recipe", "huge"), "recipe"), (("--steps", "0"), "steps"), (("--eval-trials", "0"), "eval_trials"),
                                         (("--eval-budget-minutes", "-1"), "eval_budget_minutes")])
def test_bad_arguments_are_refused_by_name(argv, field):
    with pytest.raises(InvalidArgumentError) as e:
        run_train_tiny(_args(*argv))
    assert e.value.field == field


def test_the_cards_command_drops_the_evaluation_only_flags():
    argv = ["--recipe", "kvtier-tiny", "--eval-only", "--eval-budget-minutes", "30", "--seed", "1", "--eval-budget-minutes=5"]
    assert _without(argv, "--eval-only", "--eval-budget-minutes") == ["--recipe", "kvtier-tiny", "--seed", "1"]
