"""The retrieval generators: deterministic, sized in the model's tokens, and hiding exactly the answer they claim."""

from __future__ import annotations

import re

import pytest

from kvtier.errors import InvalidArgumentError
from kvtier.eval.retrieval import FILLER, make_sample, multikey_needle, passkey, variable_tracking
from kvtier.models.checkpoint_builder import corpus_texts
from kvtier.training.bpe import train_bpe
from kvtier.training.data import TokenIds


@pytest.fixture(scope="module")
def tok():
    return TokenIds(train_bpe(corpus_texts()[:4], 1024))


@pytest.mark.parametrize("task", ["passkey", "multikey", "vartrack"])
def test_same_arguments_same_sample_and_seed_changes_it(tok, task):
    a = make_sample(task, tok, 600, 0.3, seed=7)
    assert a == make_sample(task, tok, 600, 0.3, seed=7)
    assert a.answer != make_sample(task, tok, 600, 0.3, seed=8).answer


@pytest.mark.parametrize("task", ["passkey", "multikey", "vartrack"])
@pytest.mark.parametrize("n", [450, 1000, 2048])
def test_prompt_fills_the_token_budget_to_within_one_filler_sentence(tok, task, n):
    s = make_sample(task, tok, n, 0.5, seed=1)
    length = len(tok.encode(s.prompt))
    longest_sentence = max(len(tok.encode(" " + f)) for f in FILLER)
    assert s.context_tokens == length
    assert n - longest_sentence - 2 <= length <= n
    assert s.prompt == s.context + s.question and s.question.startswith("\n")


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_passkey_sits_at_the_requested_depth_and_is_the_answer(tok, depth):
    s = passkey(tok, 1500, depth, seed=3)
    key = s.answer[0]
    assert re.fullmatch(r"\d{5}", key)
    assert s.prompt.count(key) == 2  # "The pass key is K. Remember it. K is the pass key."
    haystack = s.context.split("\n", 1)[1]
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    assert abs(haystack.index(needle) / (len(haystack) - len(needle)) - depth) < 0.02
    assert s.is_correct(s.completion) and s.completion.strip() == f"{key}."
    assert not s.is_correct(" 12345.") or key == "12345"
    assert not s.is_correct(" the key")


def test_multikey_hides_one_value_per_key_and_asks_for_the_first(tok):
    s = multikey_needle(tok, 1500, 0.4, seed=11, num_distractors=4)
    found = re.findall(r"The special magic number for ([a-z]+-[a-z]+) is (\d{7})\.", s.context)
    assert len(found) == 5 and len({k for k, _ in found}) == 5
    asked = re.search(r"magic number for ([a-z]+-[a-z]+)\?", s.question).group(1)
    assert dict(found)[asked] == s.answer[0]
    assert s.is_correct(s.completion)
    wrong = next(v for k, v in found if k != asked)
    assert not s.is_correct(f" {wrong}.")
    followups = [re.fullmatch(r"\nWhat is the special magic number for (\S+)\? The special magic number for \1 is (\d{7})\.", f).groups() for f in s.followups]
    assert sorted(followups) == sorted((k, v) for k, v in found if k != asked)  # every distractor asked once, with its value


def test_variable_tracking_chain_is_ordered_and_complete(tok):
    s = variable_tracking(tok, 1500, 0.2, seed=5, num_hops=4)
    value = re.search(r"VAR [A-Z]{5} = (\d{5})\.", s.context).group(1)
    chain = [re.search(rf"VAR ([A-Z]{{5}}) = {value}\.", s.context).group(1)]
    while m := re.search(rf"VAR ([A-Z]{{5}}) = VAR {chain[-1]}\.", s.context):
        assert s.context.index(m.group(0)) > s.context.index(f"VAR {chain[-1]} =")  # a link follows its source
        chain.append(m.group(1))
    assert tuple(chain) == s.answer and len(chain) == 5
    assert s.is_correct(s.completion) and not s.is_correct(" " + " ".join(chain[:-1]))


@pytest.mark.parametrize("kwargs, field", [
    ({"context_tokens": 10}, "context_tokens"),
    ({"context_tokens": 80}, "context_tokens"),  # shorter than the task's own text
    ({"depth": 1.5}, "depth"),
    ({"task": "essay"}, "task"),
])
def test_bad_arguments_name_the_field(tok, kwargs, field):
    args = {"task": "passkey", "context_tokens": 600, "depth": 0.5, **kwargs}
    with pytest.raises(InvalidArgumentError) as e:
        make_sample(args["task"], tok, args["context_tokens"], args["depth"], seed=0)
    assert e.value.field == field
