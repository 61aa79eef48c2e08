"""Exact limits as vLLM enforces them: a length limit that does not fit the context is refused with the
field named, ``null`` and absent limits mean what vLLM's docs say, and every numeric field is range-checked."""

from __future__ import annotations

import httpx2 as httpx
import pytest
from server_process import start_server, stop

from kvtier.models.checkpoint_builder import build_random_checkpoint
from kvtier.tokenizer import Tokenizer

MAX_MODEL_LEN = 64


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_random_checkpoint(tmp_path_factory.mktemp("limits"), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, intermediate_size=64, vocab_size=2048, tokenizer_vocab_size=2048)


@pytest.fixture(scope="module")
def url(model_dir):
    proc, url = start_server(str(model_dir), "--served-model-name", "tiny", "--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-memory", str(1 << 22))
    yield url
    assert stop(proc) == 0


PROMPT = [5, 6, 7, 8, 9, 10]
MESSAGES = [{"role": "user", "content": "write a loop"}]


def chat_prompt_len(model_dir) -> int:
    tok = Tokenizer.from_pretrained(model_dir)
    return len(tok.encode(tok.apply_chat_template(MESSAGES, True), add_special_tokens=False))


def post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(url + path, json={"model": "tiny", "ignore_eos": True, **body}, timeout=60)


def completion(url: str, **body) -> httpx.Response:
    return post(url, "/v1/completions", {"prompt": PROMPT, **body})


def chat(url: str, **body) -> httpx.Response:
    return post(url, "/v1/chat/completions", {"messages": MESSAGES, **body})


def refused(r: httpx.Response, param: str) -> str:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"].startswith(param + ":"), err
    return err["message"]


def test_a_limit_past_the_context_is_refused_naming_its_field(url, model_dir):
    message = refused(chat(url, max_completion_tokens=2**31), "max_completion_tokens")
    assert f"maximum context length is {MAX_MODEL_LEN} tokens" in message
    refused(chat(url, max_tokens=2**31), "max_tokens")
    refused(completion(url, max_tokens=2**31), "max_tokens")
    # exactly at the edge: prompt + max_tokens == max_model_len runs, one more is refused
    room = MAX_MODEL_LEN - len(PROMPT)
    r = completion(url, max_tokens=room)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == room
    assert str(room + 1) in refused(completion(url, max_tokens=room + 1), "max_tokens")
    chat_room = MAX_MODEL_LEN - chat_prompt_len(model_dir)
    assert chat(url, max_completion_tokens=chat_room).json()["usage"]["completion_tokens"] == chat_room
    refused(chat(url, max_completion_tokens=chat_room + 1), "max_completion_tokens")
    # a list of prompts is refused as a whole when one of them does not fit
    refused(post(url, "/v1/completions", {"prompt": [[1, 2], list(range(1, 40))], "max_tokens": 30}), "max_tokens")


def test_null_and_absent_limits_mean_what_vllm_says(url, model_dir):
    room = MAX_MODEL_LEN - len(PROMPT)
    absent = completion(url).json()
    assert absent["usage"]["completion_tokens"] == 16 and absent["choices"][0]["finish_reason"] == "length"
    null = completion(url, max_tokens=None).json()
    assert null["usage"]["completion_tokens"] == room and null["choices"][0]["finish_reason"] == "length"
    chat_room = MAX_MODEL_LEN - chat_prompt_len(model_dir)
    for body in ({}, {"max_tokens": None}, {"max_completion_tokens": None}, {"max_tokens": None, "max_completion_tokens": None}):
        out = chat(url, **body).json()
        assert out["usage"]["completion_tokens"] == chat_room and out["choices"][0]["finish_reason"] == "length", body
    # max_completion_tokens wins over max_tokens, as in OpenAI's API
    assert chat(url, max_tokens=3, max_completion_tokens=5).json()["usage"]["completion_tokens"] == 5


OUT_OF_RANGE = [
    ("max_tokens", 0), ("max_tokens", -1), ("temperature", -0.5), ("top_p", 0), ("top_p", 1.01), ("n", 0), ("n", 10**6),
    ("seed", 2**64), ("seed", -(2**63) - 1), ("presence_penalty", 2.5), ("frequency_penalty", -2.5), ("top_k", -2), ("min_p", 1.5),
    ("repetition_penalty", 0), ("min_tokens", -1), ("min_tokens", 9), ("stop_token_ids", [-1]),
]


@pytest.mark.parametrize(("field", "value"), OUT_OF_RANGE)
@pytest.mark.parametrize("endpoint", ["completion", "chat"])
def test_every_numeric_field_is_range_checked(url, endpoint, field, value):
    send = completion if endpoint == "completion" else chat
    body = {field: value} if field != "min_tokens" else {field: value, "max_tokens": 8}
    refused(send(url, **body), field)


@pytest.mark.parametrize(("field", "value"), [("logprobs", -1), ("logprobs", 21), ("max_completion_tokens", 0), ("top_logprobs", 21), ("top_logprobs", -1)])
def test_endpoint_specific_numeric_fields_are_range_checked(url, field, value):
    if field == "logprobs":
        refused(completion(url, logprobs=value), "logprobs")
    else:
        refused(chat(url, logprobs=True, **{field: value}), field)


def test_top_logprobs_needs_logprobs(url):
    assert "logprobs" in refused(chat(url, top_logprobs=2), "top_logprobs")
    r = chat(url, top_logprobs=2, logprobs=True, max_completion_tokens=2)
    assert r.status_code == 200 and len(r.json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 2
