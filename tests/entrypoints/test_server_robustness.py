"""The server under abuse: hundreds of malformed or out-of-range bodies never get a 5xx, and 200
concurrent streams against a KV pool sized for about 20 all finish with the text they get alone."""

from __future__ import annotations

import asyncio
import json

import httpx2 as httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.entrypoints.test_openai_server import metric, start_server, stop

# ---- fuzz ---------------------------------------------------------------------------------------

junk = st.one_of(st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(allow_nan=False), st.text(max_size=8),
                 st.lists(st.integers(-5, 3000), max_size=4), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
numbers = st.one_of(st.integers(-5, 300), st.floats(-10, 10, allow_nan=False), junk)
prompts = st.one_of(st.text(max_size=30), st.lists(st.integers(-3, 5000), max_size=8), st.lists(st.text(max_size=5), max_size=3),
                    st.lists(st.lists(st.integers(0, 2100), max_size=3), max_size=2), junk)
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", 3]), "content": st.one_of(st.text(max_size=20), junk)})
messages = st.one_of(st.lists(message, max_size=3), junk)
common = {
    "model": st.sampled_from(["tiny", "tiny", "other", 5]), "max_tokens": numbers, "temperature": numbers, "top_p": numbers,
    "n": st.one_of(st.integers(-2, 3), junk), "stop": st.one_of(st.text(max_size=3), st.lists(st.text(max_size=3), max_size=2), junk),
    "seed": numbers, "presence_penalty": numbers, "frequency_penalty": numbers, "top_k": numbers, "min_p": numbers,
    "repetition_penalty": numbers, "stream": st.one_of(st.booleans(), junk), "ignore_eos": st.one_of(st.booleans(), junk),
    "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": st.booleans()}), junk), "min_tokens": numbers,
}
completion_bodies = st.fixed_dictionaries({}, optional={**common, "prompt": prompts, "logprobs": numbers, "echo": st.one_of(st.booleans(), junk)})
chat_bodies = st.fixed_dictionaries({}, optional={**common, "messages": messages, "logprobs": st.one_of(st.booleans(), junk), "top_logprobs": numbers,
                                                    "max_completion_tokens": numbers})


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    from kvtier.models.checkpoint_builder import build_random_checkpoint

    model = build_random_checkpoint(tmp_path_factory.mktemp("fuzz"), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                    num_key_value_heads=1, intermediate_size=64, vocab_size=2048, tokenizer_vocab_size=2048)
    proc, url = start_server(str(model), "--max-model-len", "48")
    yield url
    assert stop(proc) == 0


COUNT = {"sent": 0}


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(endpoint=st.sampled_from(["/v1/completions", "/v1/chat/completions"]), data=st.data())
def test_fuzzed_bodies_never_get_a_5xx(fuzz_server, endpoint, data):
    body = data.draw(completion_bodies if endpoint.endswith("/completions") and "chat" not in endpoint else chat_bodies)
    raw = data.draw(st.sampled_from(["json", "json", "json", "truncated", "not-an-object"]))
    content = {"json": json.dumps(body), "truncated": json.dumps(body)[:-1] or "{", "not-an-object": json.dumps([body])}[raw]
    for path in (endpoint, "/tokenize" if raw == "json" else endpoint):
        r = httpx.post(fuzz_server + path, content=content, headers={"content-type": "application/json"}, timeout=60)
        COUNT["sent"] += 1
        assert r.status_code < 500, (path, content, r.text)
        if r.status_code >= 400:
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["code"] == r.status_code


def test_fuzz_sent_enough_and_server_still_correct(fuzz_server):
    assert COUNT["sent"] >= 500
    body = {"model": "tiny", "prompt": "def f(x):", "max_tokens": 5, "temperature": 0, "ignore_eos": True}
    a = httpx.post(fuzz_server + "/v1/completions", json=body, timeout=30).json()
    b = httpx.post(fuzz_server + "/v1/completions", json=body, timeout=30).json()
    assert a["usage"]["completion_tokens"] == 5 and a["choices"][0]["text"] == b["choices"][0]["text"]


# ---- overload -----------------------------------------------------------------------------------

async def stream_text(client: httpx.AsyncClient, url: str, body: dict) -> str:
    parts = []
    async with client.stream("POST", url + "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                parts.extend(c["text"] for c in json.loads(line[6:])["choices"])
    return "".join(parts)


def test_overload_preempts_and_loses_nothing(tmp_path):
    from kvtier.models.checkpoint_builder import build_random_checkpoint

    model = build_random_checkpoint(tmp_path / "m", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                    intermediate_size=128, vocab_size=2048, tokenizer_vocab_size=2048)
    per_block = 2 * 2 * 2 * 16 * 4 * 16  # K+V, layers, kv heads, head_dim, fp32, block_size
    # each request holds 24 prompt + 40 output tokens = 4 blocks: 80 blocks fit 20 requests
    proc, url = start_server(str(model), "--kv-cache-memory", str(80 * per_block), "--no-enable-prefix-caching", "--max-num-seqs", "256")
    try:
        prompts = [[3 + (i * 131 + j * 7) % 2000 for j in range(24)] for i in range(20)]
        body = {"model": "tiny", "max_tokens": 40, "temperature": 0, "ignore_eos": True}

        async def run() -> tuple[list[str], list[str]]:
            async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=250)) as client:
                alone = [await stream_text(client, url, {**body, "prompt": p}) for p in prompts]
                crowd = await asyncio.gather(*(stream_text(client, url, {**body, "prompt": prompts[i % 20]}) for i in range(200)))
                return alone, crowd

        alone, crowd = asyncio.run(run())
        assert all(crowd[i] == alone[i % 20] for i in range(200)), [i for i in range(200) if crowd[i] != alone[i % 20]]
        assert metric(url, "kvtier:num_preemptions_total") > 0
        assert metric(url, "kvtier:num_requests_running") == 0 and metric(url, "kvtier:num_requests_waiting") == 0
    finally:
        assert stop(proc) == 0


def test_full_queue_answers_503_and_serves_the_rest(tmp_path):
    from kvtier.models.checkpoint_builder import build_random_checkpoint

    model = build_random_checkpoint(tmp_path / "q", hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                    intermediate_size=64, vocab_size=2048, tokenizer_vocab_size=2048)
    proc, url = start_server(str(model), "--max-queue-len", "2", "--max-num-seqs", "1")
    try:
        body = {"model": "tiny", "prompt": "x = 1", "max_tokens": 30, "temperature": 0, "ignore_eos": True}

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=120) as client:
                return await asyncio.gather(*(client.post(url + "/v1/completions", json=body) for _ in range(12)))

        codes = sorted(r.status_code for r in asyncio.run(burst()))
        assert set(codes) == {200, 503} and codes.count(200) >= 2, codes
        rejected = next(r for r in asyncio.run(burst()) if r.status_code == 503).json()["error"]
        assert rejected["type"] == "server_overloaded" and "max_queue_len" in rejected["message"]
    finally:
        assert stop(proc) == 0
