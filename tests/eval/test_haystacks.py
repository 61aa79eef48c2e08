"""Haystacks of several kinds: seeded, filled close to the token budget, drawn from the split asked for, and a held-out
kind whose text is in no training file."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer

from kvtier.errors import InvalidArgumentError
from kvtier.eval.haystacks import FILLER, HAYSTACKS, HELDOUT_FILES, Haystack, _split_units
from kvtier.eval.retrieval import TASKS, make_sample
from kvtier.models.embedded import resolve_model
from kvtier.training.corpus import read_texts, split_corpus, stdlib_sources
from kvtier.training.data import TokenIds


@pytest.fixture(scope="module")
def ids() -> TokenIds:
    return TokenIds(HFTokenizer.from_file(str(Path(resolve_model("kvtier-tiny")) / "tokenizer.json")))


@pytest.mark.parametrize("kind", HAYSTACKS)
def test_every_kind_fills_its_budget_and_hides_the_needle(ids, kind):
    for task in TASKS:
        for budget in (512, 2048):
            sample = make_sample(task, ids, budget, 0.5, 11, haystack=kind)
            assert 0.95 * budget <= sample.context_tokens <= budget, (task, budget, sample.context_tokens)
            assert len(ids.encode(sample.prompt)) == sample.context_tokens
            assert all(a in sample.context for a in sample.answer), "every answer is in the haystack"
            assert sample == make_sample(task, ids, budget, 0.5, 11, haystack=kind), "the same seed gives the same sample"


def test_noise_is_the_filler_as_before(ids):
    assert Haystack("noise", 3).take(12) == [FILLER[i % 5] for i in range(12)]
    assert make_sample("passkey", ids, 512, 0.2, 4) == make_sample("passkey", ids, 512, 0.2, 4, haystack="noise")


def test_seeds_draw_other_text_and_splits_keep_apart():
    assert Haystack("code", 1).take(50) != Haystack("code", 2).take(50)
    validation_lines = {line for source in _split_units("validation", "code") for line in source}
    assert set(Haystack("code", 5, "validation").take(400)) <= validation_lines
    assert not set(Haystack("code", 5, "train").take(400)) <= validation_lines


def test_the_heldout_kind_is_in_no_training_file():
    """idlelib's text files are not ``*.py``, so the corpus (and the tokenizer trained on it) never read them; and no
    long sentence of theirs appears in a training file."""
    folder = Path(sysconfig.get_paths()["stdlib"]) / "idlelib"
    assert not {folder / name for name in HELDOUT_FILES} & set(stdlib_sources())
    corpus = " ".join(" ".join(read_texts(split_corpus().train)).split())  # whitespace folded, as the pieces fold it
    sentences = [p for p in Haystack("heldout", 0).take(3000) if len(p) > 60][::40]
    assert len(sentences) >= 20
    assert not [s for s in sentences if s in corpus], "a held-out sentence is in the training text"


def test_bad_kind_or_split_names_the_field(ids):
    with pytest.raises(InvalidArgumentError, match="haystack: must be one of noise, code, prose, mixed, heldout"):
        make_sample("passkey", ids, 512, 0.5, 1, haystack="poetry")
    with pytest.raises(InvalidArgumentError, match="split: must be one of train, validation"):
        Haystack("code", 1, "test")
