"""SamplingParams / BeamSearchParams validation: every bad field is named, with its allowed range."""

from __future__ import annotations

import dataclasses

import pytest

from kvtier.errors import InvalidArgumentError
from kvtier.sampling_params import BeamSearchParams, SamplingParams

VLLM_DEFAULTS = {
    "n": 1,
    "best_of": None,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "repetition_penalty": 1.0,
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 0,
    "min_p": 0.0,
    "seed": None,
    "stop": [],
    "stop_token_ids": [],
    "logits_processors": [],
    "include_stop_str_in_output": False,
    "ignore_eos": False,
    "max_tokens": 16,
    "min_tokens": 0,
    "logprobs": None,
    "prompt_logprobs": None,
    "skip_special_tokens": True,
    "use_beam_search": False,
    "length_penalty": 1.0,
    "early_stopping": False,
}

# (kwargs, field the error must name, text its message must contain)
BAD_SAMPLING = [
    ({"n": 0}, "n", ">= 1"),
    ({"n": True}, "n", ">= 1"),
    ({"n": 2.0}, "n", "integer"),
    ({"n": 3, "best_of": 2}, "best_of", ">= n (3)"),
    ({"best_of": 0}, "best_of", ">= n"),
    ({"presence_penalty": 2.5}, "presence_penalty", "[-2, 2]"),
    ({"presence_penalty": "0.1"}, "presence_penalty", "[-2, 2]"),
    ({"frequency_penalty": -2.01}, "frequency_penalty", "[-2, 2]"),
    ({"repetition_penalty": 0.0}, "repetition_penalty", "> 0"),
    ({"repetition_penalty": -1}, "repetition_penalty", "> 0"),
    ({"temperature": -0.1}, "temperature", ">= 0"),
    ({"temperature": "hot"}, "temperature", ">= 0"),
    ({"temperature": True}, "temperature", "number"),
    ({"temperature": float("nan")}, "temperature", "finite"),
    ({"temperature": float("inf")}, "temperature", "finite"),
    ({"top_p": 0.0}, "top_p", "(0, 1]"),
    ({"top_p": 1.5}, "top_p", "(0, 1]"),
    ({"top_p": float("nan")}, "top_p", "(0, 1]"),
    ({"top_k": -2}, "top_k", "-1 or an integer >= 0"),
    ({"top_k": 5.0}, "top_k", "-1 or an integer >= 0"),
    ({"top_k": False}, "top_k", "-1 or an integer >= 0"),
    ({"min_p": 1.1}, "min_p", "[0, 1]"),
    ({"min_p": -0.1}, "min_p", "[0, 1]"),
    ({"seed": "42"}, "seed", "integer"),
    ({"seed": 1.5}, "seed", "integer"),
    ({"seed": 2**64}, "seed", "integer in"),
    ({"stop": ""}, "stop", "non-empty"),
    ({"stop": ["ok", ""]}, "stop", "non-empty"),
    ({"stop": [3]}, "stop", "non-empty string"),
    ({"stop": 3}, "stop", "non-empty string"),
    ({"stop_token_ids": [-1]}, "stop_token_ids", ">= 0"),
    ({"stop_token_ids": [1.0]}, "stop_token_ids", "integer"),
    ({"stop_token_ids": [True]}, "stop_token_ids", "integer"),
    ({"stop_token_ids": 5}, "stop_token_ids", "list"),
    ({"max_tokens": 0}, "max_tokens", ">= 1"),
    ({"max_tokens": True}, "max_tokens", ">= 1"),
    ({"max_tokens": "16"}, "max_tokens", ">= 1"),
    ({"min_tokens": -1}, "min_tokens", "[0, max_tokens (16)]"),
    ({"min_tokens": 11, "max_tokens": 10}, "min_tokens", "[0, max_tokens (10)]"),
    ({"min_tokens": -1, "max_tokens": None}, "min_tokens", ">= 0"),
    ({"logprobs": -1}, "logprobs", "[0, 20]"),
    ({"logprobs": 21}, "logprobs", "OpenAI"),
    ({"logprobs": 2.0}, "logprobs", "[0, 20]"),
    ({"prompt_logprobs": 21}, "prompt_logprobs", "[0, 20]"),
    ({"length_penalty": float("inf")}, "length_penalty", "finite"),
    ({"length_penalty": "1"}, "length_penalty", "number"),
    ({"ignore_eos": 1}, "ignore_eos", "True or False"),
    ({"skip_special_tokens": None}, "skip_special_tokens", "True or False"),
    ({"include_stop_str_in_output": "yes"}, "include_stop_str_in_output", "True or False"),
    ({"use_beam_search": 1}, "use_beam_search", "True or False"),
    ({"early_stopping": 0}, "early_stopping", 'True, False or "never"'),
    ({"early_stopping": "always"}, "early_stopping", 'True, False or "never"'),
    ({"n": 2, "best_of": 3}, "best_of", "without use_beam_search"),
    ({"use_beam_search": True}, "temperature", "must be 0"),
    ({"use_beam_search": True, "temperature": 0.5}, "temperature", "must be 0"),
    ({"logits_processors": len}, "logits_processors", "list of callables"),
    ({"logits_processors": [3]}, "logits_processors", "(output_token_ids, logits)"),
    ({"logits_processors": [lambda logits: logits]}, "logits_processors", "(prompt_token_ids, output_token_ids, logits)"),
    ({"logits_processors": [lambda a, b: b], "use_beam_search": True, "temperature": 0.0}, "logits_processors", "use_beam_search"),
]


@pytest.mark.parametrize("kwargs,field,text", BAD_SAMPLING, ids=[f"{f}={k}" for k, f, _ in BAD_SAMPLING])
def test_bad_sampling_field_is_named_with_its_range(kwargs, field, text):
    with pytest.raises(InvalidArgumentError) as e:
        SamplingParams(**kwargs)
    assert e.value.field == field
    assert text in e.value.message
    assert str(e.value).startswith(f"{field}: ")


def test_defaults_match_vllm():
    p = SamplingParams()
    assert {f.name: getattr(p, f.name) for f in dataclasses.fields(p)} == VLLM_DEFAULTS


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n": 3, "best_of": 3},
        {"presence_penalty": -2, "frequency_penalty": 2},
        {"top_p": 1, "min_p": 1, "top_k": 1},
        {"min_p": 0},
        {"temperature": 0},
        {"logprobs": 0, "prompt_logprobs": 20},
        {"max_tokens": None, "min_tokens": 1000},
        {"max_tokens": 5, "min_tokens": 5},
        {"seed": -(2**63)},
        {"seed": 2**64 - 1},
        {"stop_token_ids": (2, 0)},
        {"use_beam_search": True, "temperature": 0.0, "n": 4},
        {"length_penalty": -3.5},
    ],
)
def test_boundary_values_are_accepted(kwargs):
    SamplingParams(**kwargs)


def test_normalisation():
    assert SamplingParams(top_k=-1).top_k == 0
    assert SamplingParams(top_k=7).top_k == 7
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(stop_token_ids=(3, 4)).stop_token_ids == [3, 4]
    p = SamplingParams(temperature=1, top_p=1)
    assert isinstance(p.temperature, float) and isinstance(p.top_p, float)


def test_is_greedy():
    assert SamplingParams(temperature=0).is_greedy
    assert SamplingParams(temperature=0.7, top_k=1).is_greedy
    assert not SamplingParams(temperature=0.7, top_k=2).is_greedy
    assert not SamplingParams(top_k=-1).is_greedy


def test_clone_is_equal_but_independent():
    p = SamplingParams(stop=["x"], stop_token_ids=[5], seed=3, temperature=0.5)
    q = p.clone()
    assert q == p and q is not p
    q.stop.append("y")
    q.stop_token_ids.append(6)
    assert p.stop == ["x"] and p.stop_token_ids == [5]


BAD_BEAM = [
    ({"beam_width": 0, "max_tokens": 4}, "beam_width", ">= 1"),
    ({"beam_width": 2.0, "max_tokens": 4}, "beam_width", "integer"),
    ({"beam_width": 2, "max_tokens": 0}, "max_tokens", ">= 1"),
    ({"beam_width": 2, "max_tokens": True}, "max_tokens", ">= 1"),
    ({"beam_width": 2, "max_tokens": 4, "ignore_eos": "no"}, "ignore_eos", "True or False"),
    ({"beam_width": 2, "max_tokens": 4, "temperature": -1.0}, "temperature", "must be 0"),
    ({"beam_width": 2, "max_tokens": 4, "temperature": 0.7}, "temperature", "must be 0"),
    ({"beam_width": 2, "max_tokens": 4, "early_stopping": "yes"}, "early_stopping", '"never"'),
    ({"beam_width": 2, "max_tokens": 4, "length_penalty": float("nan")}, "length_penalty", "finite"),
]


@pytest.mark.parametrize("kwargs,field,text", BAD_BEAM, ids=[f"{f}-{i}" for i, (_, f, _) in enumerate(BAD_BEAM)])
def test_bad_beam_field_is_named_with_its_range(kwargs, field, text):
    with pytest.raises(InvalidArgumentError) as e:
        BeamSearchParams(**kwargs)
    assert e.value.field == field
    assert text in e.value.message


def test_beam_defaults():
    b = BeamSearchParams(beam_width=3, max_tokens=8)
    assert (b.ignore_eos, b.temperature, b.length_penalty) == (False, 0.0, 1.0)
