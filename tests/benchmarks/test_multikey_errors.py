"""benchmarks/multikey_errors.py sorts replies by hand-worked cases on a real generated haystack."""

from __future__ import annotations

from pathlib import Path

import pytest
from multikey_errors import NEEDLE, classify
from tokenizers import Tokenizer

from kvtier.eval.retrieval import multikey_needle
from kvtier.training.data import TokenIds

TOKENIZER = Path(__file__).resolve().parents[2] / "kvtier" / "embedded" / "kvtier-tiny" / "tokenizer.json"


@pytest.fixture(scope="module")
def sample():
    return multikey_needle(TokenIds(Tokenizer.from_file(str(TOKENIZER))), 1024, 0.0, seed=7, num_distractors=4)


def test_each_kind_of_reply(sample):
    values = [v for _, v in NEEDLE.findall(sample.context)]
    assert len(values) == 5 and values[0] == sample.answer[0]  # depth 0: the queried needle comes first
    last, middle = values[-1], next(v for v in values[1:-1])
    stranger = next(str(n) for n in range(1_000_000, 9_999_999, 7_919) if not any(v.startswith(str(n)[:3]) for v in values))
    assert classify(sample, f" {sample.answer[0]}.") == "right"
    assert classify(sample, f" {last}.") == "another needle, the last"
    assert classify(sample, f" {middle}.") == "another needle, not the last"
    assert classify(sample, f" {sample.answer[0][:4]}{stranger[4:]}.") == "starts like a needle, goes on differently"
    assert classify(sample, f" {stranger}.") == "other"
    assert classify(sample, " no number") == "other"
