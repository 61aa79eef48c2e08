"""Haystacks of several kinds and needles in several phrasings: seeded, filled close to the token budget, drawn from the
split asked for; a held-out haystack kind whose text is in no training file, and held-out key phrases no training
text or document uses."""

from __future__ import annotations

import re
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer

from kvtier.errors import InvalidArgumentError
from kvtier.eval.haystacks import FILLER, HAYSTACKS, HELDOUT_FILES, Haystack, _split_units
from kvtier.eval.retrieval import ADJECTIVES, NOUNS, PHRASINGS, TASKS, make_sample, worded
from kvtier.models.embedded import resolve_model
from kvtier.training.corpus import read_texts, split_corpus, stdlib_sources
from kvtier.training.data import BatchMaker, RetrievalMix, TokenIds


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


@pytest.mark.parametrize("task", ["passkey", "multikey"])
def test_every_phrasing_hides_its_needle_and_asks_with_the_needles_key_phrase(ids, task):
    for name in PHRASINGS[task]:
        sample, say = make_sample(task, ids, 512, 0.5, 21, phrasing=name), worded(task, name, 21)
        needle = next(s for s in re.split(r"(?<=\.) |\n", sample.context) if sample.answer[0] in s)
        assert say.key_phrase in needle.lower().replace("numbers", "number"), (name, needle)
        assert say.key_phrase in sample.question.lower(), (name, "the question restates the needle's key phrase")
        assert sample.prompt.endswith(sample.question) and sample.completion == f" {sample.answer[0]}."


def test_held_out_key_phrases_are_in_no_training_text_or_document():
    held_out = {say.key_phrase for table in PHRASINGS.values() for say in table.values() if say.held_out}
    assert held_out == {"access code", "secret number"}
    assert not held_out & {say.key_phrase for table in PHRASINGS.values() for say in table.values() if not say.held_out}
    drawn = {worded("passkey", "named", seed).key_phrase for seed in range(200)}
    assert len(drawn) > 150 and all(len(p.split()) == 2 for p in drawn), "a key phrase of two random words per sample"
    assert not {w for p in held_out for w in p.split()} & set(ADJECTIVES + NOUNS), "no drawn key phrase shares a word with a held-out one"
    corpus = " ".join(read_texts(split_corpus().train)).lower()
    assert not [phrase for phrase in held_out if phrase in corpus]
    tok = HFTokenizer.from_file(str(Path(resolve_model("kvtier-tiny")) / "tokenizer.json"))
    maker = BatchMaker(tok, np.arange(3, 4000, dtype=np.int32), seed=1)
    mix = RetrievalMix(retrieval_fraction=1.0, copy_fraction=0.0, passkey=0.5, multikey=0.5, vartrack=0.0)
    text = tok.decode([t for _ in range(8) for t in maker.row(1024, mix)]).lower()
    assert "pass key" in text and "magic number" in text
    assert not [phrase for phrase in held_out if phrase in text], "training documents never use a held-out phrasing"


def test_an_unknown_phrasing_names_the_field(ids):
    with pytest.raises(InvalidArgumentError, match="phrasing: must be one of landmark, ruler, named, access-code, secret-number for passkey"):
        make_sample("passkey", ids, 512, 0.5, 1, phrasing="poem")
    with pytest.raises(InvalidArgumentError, match="phrasing: must be None for vartrack"):
        make_sample("vartrack", ids, 512, 0.5, 1, phrasing="ruler")
