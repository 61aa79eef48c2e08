"""RULER's common-words extraction: the list really has the common words it claims, at RULER's frequencies, fills the
token budget, is the same for the same seed, and a reply scores the fraction of the common words it names."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from kvtier.errors import InvalidArgumentError
from kvtier.eval.common_words import CommonWordsSample, common_words, word_pool
from kvtier.eval.probe import score


@pytest.fixture(scope="module")
def tok():
    from tokenizers import Tokenizer

    from kvtier.models.embedded import resolve_model
    from kvtier.training.data import TokenIds

    return TokenIds(Tokenizer.from_file(f"{resolve_model('kvtier-tiny')}/tokenizer.json"))


def listed(sample: CommonWordsSample) -> list[str]:
    """The list's words in order, read back from the prompt; its numbering must run 1, 2, 3, ..."""
    entries = re.findall(r"(\d+)\. ([a-z]+)", sample.context)
    assert [int(i) for i, _ in entries] == list(range(1, len(entries) + 1))
    return [w for _, w in entries]


@pytest.mark.parametrize("n, freqs", [(600, (6, 1)), (2048, (6, 1)), (4096, (30, 3))])
def test_the_answer_is_the_most_frequent_words_at_rulers_frequencies(tok, n, freqs):
    s = common_words(tok, n, seed=3)
    counts = Counter(listed(s))
    assert len(s.answer) == 10 and set(s.answer) == {w for w, _ in counts.most_common(10)}
    assert {counts[w] for w in s.answer} == {freqs[0]} and {c for w, c in counts.items() if w not in s.answer} == {freqs[1]}
    assert len(counts) > 20 and set(counts) <= set(word_pool())
    assert s.completion == " " + " ".join(f"{i}. {w}" for i, w in enumerate(s.answer, 1)) and s.depth is None


@pytest.mark.parametrize("n", [600, 2048, 4096])
def test_the_prompt_fills_the_token_budget_and_ends_with_rulers_question(tok, n):
    s = common_words(tok, n, seed=1)
    length = len(tok.encode(s.prompt))
    assert s.context_tokens == length and n - 40 <= length <= n  # one more rare word (up to 3 entries) would not fit
    assert s.prompt == s.context + s.question
    assert s.question == ("\nQuestion: What are the 10 most common words in the above list? Answer: The top 10 words appearing most often "
                          "in the list are:")


def test_same_seed_same_sample_and_another_seed_another(tok):
    a = common_words(tok, 1024, seed=7)
    assert a == common_words(tok, 1024, seed=7)
    b = common_words(tok, 1024, seed=8)
    assert a.answer != b.answer and a.prompt != b.prompt


def test_a_reply_scores_the_fraction_of_common_words_it_names_as_whole_words():
    s = CommonWordsSample("commonwords", "p", "q", "", ("line", "tree", "wrap", "size"), 4, None)
    assert s.score(" 1. Tree 2. lines 3. wrap, 4. sizes") == 0.5  # tree and wrap; "lines" and "sizes" are other words
    assert not s.is_correct(" 1. Tree 2. lines 3. wrap, 4. sizes")
    assert s.score("size wrap tree line") == 1.0 and s.is_correct("size wrap tree line")
    assert s.score("") == 0.0


def test_probe_score_averages_fractional_scores_and_has_no_depths():
    s = CommonWordsSample("commonwords", "p", "q", "", ("line", "tree", "wrap", "size"), 4, None)
    r = score("commonwords", 512, [(s, "tree"), (s, "line tree wrap"), (s, "nothing")])
    assert r.trials == 3 and r.accuracy == pytest.approx((0.25 + 0.75 + 0.0) / 3) and r.by_depth == {}


def test_contexts_the_list_cannot_fill_are_refused_naming_the_context(tok):
    with pytest.raises(InvalidArgumentError) as e:
        common_words(tok, 256, seed=0)  # sixty entries of the ten common words alone take more
    assert e.value.field == "context_tokens" and "at least" in e.value.message
    with pytest.raises(InvalidArgumentError) as e:
        common_words(tok, 1_000_000, seed=0)  # more rare words than the held-out text has
    assert e.value.field == "context_tokens" and "word list" in e.value.message
