"""The OpenAI-compatible server, started for real in a subprocess on a free loopback port and driven
with the official ``openai`` client; answers are checked against the offline engine on the same weights."""

from __future__ import annotations

import re
import subprocess
import time

import httpx2 as httpx
import openai
import pytest
import server_process
from server_process import stop

from kvtier import LLM, SamplingParams
from kvtier.models.checkpoint_builder import build_random_checkpoint

KV = str(1 << 24)


def start_server(model: str, *extra: str) -> tuple[subprocess.Popen, str]:
    return server_process.start_server(model, "--served-model-name", "tiny", "--kv-cache-memory", KV, *extra)


@pytest.fixture(scope="module", params=["llama", "kvtier-tiny-hybrid"])
def model_dir(request, tmp_path_factory):
    """A random Llama, and the shipped hybrid (attention + Mamba2): every server test runs on both."""
    if request.param == "kvtier-tiny-hybrid":
        return request.param
    return str(build_random_checkpoint(tmp_path_factory.mktemp("srv"), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=128, vocab_size=2048, tokenizer_vocab_size=2048))


@pytest.fixture(scope="module")
def server(model_dir):
    proc, url = start_server(model_dir)
    yield url
    assert stop(proc) == 0, "SIGTERM must shut the server down cleanly (exit 0)"


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def offline(model_dir):
    return LLM(model_dir, kv_cache_memory=int(KV))


PROMPT = "def fibonacci(n):"


def test_completion_matches_offline_engine_with_exact_usage(client, offline):
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    ref = offline.generate(PROMPT, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)[0]
    assert r.choices[0].text == ref.outputs[0].text
    assert r.usage.prompt_tokens == len(ref.prompt_token_ids) and r.usage.completion_tokens == 12 and r.usage.total_tokens == len(ref.prompt_token_ids) + 12
    assert r.choices[0].finish_reason == "length"


def test_streamed_text_equals_non_streamed_for_the_same_seed(client):
    kw = dict(model="tiny", prompt=PROMPT, max_tokens=16, temperature=0.9, seed=11, extra_body={"ignore_eos": True})
    whole = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert chunks[-1].usage.completion_tokens == 16


def test_chat_stream_and_non_stream_agree(client, offline):
    msgs = [{"role": "user", "content": "write a loop"}]
    whole = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0, seed=1)
    streamed = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0, seed=1, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == whole.choices[0].message.content
    ref = offline.chat(msgs, SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)[0]
    assert whole.choices[0].message.content == ref.outputs[0].text
    assert whole.usage.prompt_tokens == len(ref.prompt_token_ids)


def test_n_stop_and_logprobs(client):
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=1.0, n=3, seed=2, logprobs=2, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    for c in r.choices:
        assert len(c.logprobs.tokens) == 8 and len(c.logprobs.token_logprobs) == 8
        assert all(lp <= 0 for lp in c.logprobs.token_logprobs)
        assert "".join(c.logprobs.tokens) == c.text
    assert r.usage.completion_tokens == 24
    text = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}).choices[0].text
    stop = text[4:7]
    cut = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop], extra_body={"ignore_eos": True})
    assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop], stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in streamed if c.choices) == cut.choices[0].text


def test_errors_have_openai_shape_and_status(server, client, offline):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt=PROMPT, top_p=1.5)
    assert e.value.body["param"] == "top_p" and "(0, 1]" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens=0)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt=PROMPT)
    assert e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt=[5] * 5000)
    assert e.value.body["param"] == "prompt"
    r = httpx.post(server + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()
    # still serving
    assert client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2, temperature=0).usage.completion_tokens == 2


def test_models_health_version_tokenize(server, offline):
    assert httpx.get(server + "/v1/models").json()["data"][0]["id"] == "tiny"
    assert httpx.get(server + "/health").status_code == 200
    assert re.match(r"\d+\.\d+", httpx.get(server + "/version").json()["version"])
    ids = httpx.post(server + "/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    assert ids == offline.get_tokenizer().encode(PROMPT)
    assert httpx.post(server + "/detokenize", json={"tokens": ids}).json()["prompt"].endswith(PROMPT)


def metric(server: str, name: str) -> float:
    text = httpx.get(server + "/metrics").text
    return float(re.search(rf"^{re.escape(name)}\{{[^}}]*\}} (\S+)$", text, re.M).group(1))


def test_disconnect_frees_kv_blocks(server):
    total_free = metric(server, "kvtier:kv_cache_free_blocks") + metric(server, "kvtier:kv_cache_cached_blocks")
    body = {"model": "tiny", "prompt": [7] * 300, "max_tokens": 2000, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server + "/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(line for line in lines if line.startswith("data:"))
        assert metric(server, "kvtier:num_requests_running") == 1
        assert metric(server, "kvtier:kv_cache_usage_perc") > 0
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and metric(server, "kvtier:num_requests_running") > 0:
        time.sleep(0.1)
    assert metric(server, "kvtier:num_requests_running") == 0
    assert metric(server, "kvtier:kv_cache_usage_perc") == 0
    assert metric(server, "kvtier:kv_cache_free_blocks") + metric(server, "kvtier:kv_cache_cached_blocks") == total_free


def test_prefix_cache_figures_are_exposed(server, client, model_dir):
    """Hits for both model kinds; a hybrid's state prefix cache also shows the states it holds and its evictions."""
    hits = metric(server, "kvtier:prefix_cache_hits_total")
    shared = [11 + i % 50 for i in range(70)]
    for tail in ([5, 6], [7, 8], [9, 10]):
        client.completions.create(model="tiny", prompt=shared + tail, max_tokens=2, temperature=0)
    assert metric(server, "kvtier:prefix_cache_hits_total") - hits >= 64
    assert metric(server, "vllm:prefix_cache_hits_total") >= metric(server, "kvtier:prefix_cache_hits_total") - hits
    if model_dir == "kvtier-tiny-hybrid":
        assert metric(server, "kvtier:prefix_cache_states") >= 3 and metric(server, "kvtier:prefix_cache_evictions_total") >= 0
        assert metric(server, "kvtier:mamba_state_slots_cached") >= 3


def test_api_key_is_enforced(model_dir):
    proc, url = start_server(model_dir, "--api-key", "sekret")
    try:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        assert openai.OpenAI(base_url=url + "/v1", api_key="sekret", max_retries=0).models.list().data[0].id == "tiny"
    finally:
        assert stop(proc) == 0


def test_a_kv_method_serves_with_the_same_api(tmp_path):
    """``kvtier serve --kv-method``: a long prompt compressed by StreamingLLM still completes through the OpenAI client."""
    model = str(build_random_checkpoint(tmp_path / "m", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        intermediate_size=128, vocab_size=2048, tokenizer_vocab_size=2048))
    proc, url = start_server(model, "--kv-method", "streamingllm", "--kv-method-config", '{"budget": 0.25}')
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        out = client.completions.create(model="tiny", prompt=[7, 8, 9] * 60, max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
        assert out.usage.prompt_tokens == 180 and out.usage.completion_tokens == 5
    finally:
        assert stop(proc) == 0
