"""Faults are boring: a client that leaves (any endpoint, any n, streaming or not, before or after its
first token) is aborted at the next step, gives back every KV block and leaves one debug line and no
traceback in the server's log; SIGTERM ends in-flight streams with ``finish_reason`` "abort"."""

from __future__ import annotations

import json
import re
import signal
import tempfile
import threading
import time
from collections.abc import Callable

import httpx2 as httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_process import start_server, stop

from kvtier.models.checkpoint_builder import build_random_checkpoint

ABORT_LINE = re.compile(r"DEBUG .*kvtier\.engine\.async_engine: aborted (\S+(?:, \S+)*): its caller went away")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_random_checkpoint(tmp_path_factory.mktemp("faults"), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, intermediate_size=64, vocab_size=2048, tokenizer_vocab_size=2048)


def samples(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample at /metrics, keyed by (name, sorted labels), read with prometheus_client's own parser."""
    out = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(url: str, name: str, **labels: str) -> float:
    return samples(url)[(name, tuple(sorted({"model_name": "tiny", **labels}.items())))]


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def wait_idle(url: str, timeout: float = 30) -> None:
    wait_for(lambda: value(url, "kvtier:num_requests_running") == 0 and value(url, "kvtier:num_requests_waiting") == 0, "the server to go idle", timeout)


def body(endpoint: str, n: int, stream: bool, max_tokens: int = 2000) -> dict:
    head = {"prompt": "def f(x):"} if endpoint == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]}
    return {**head, "model": "tiny", "n": n, "max_tokens": max_tokens, "ignore_eos": True, "stream": stream}


def leave_stream(url: str, endpoint: str, n: int, data_lines: int) -> None:
    """Open a stream, read ``data_lines`` events (0: leave before any token), then drop the connection."""
    with httpx.stream("POST", url + endpoint, json=body(endpoint, n, True), timeout=30) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        for _ in range(data_lines):
            next(line for line in lines if line.startswith("data:"))


def leave_request(url: str, endpoint: str, n: int) -> None:
    """A non-streaming request whose client gives up after 0.5 s."""
    with pytest.raises(httpx.TimeoutException):
        httpx.post(url + endpoint, json=body(endpoint, n, False), timeout=0.5)


def test_clients_that_leave_are_aborted_cleanly(model_dir):
    log = tempfile.NamedTemporaryFile("w+", suffix=".log")
    proc, url = start_server(str(model_dir), "--served-model-name", "tiny", "--kv-cache-memory", str(1 << 22), "--max-num-seqs", "1",
                             "--uvicorn-log-level", "debug", log=log)
    try:
        total = value(url, "kvtier:kv_cache_free_blocks")
        left = 0
        for endpoint in ("/v1/completions", "/v1/chat/completions"):
            for n in (1, 3):
                leave_stream(url, endpoint, n, data_lines=3)  # after its first tokens
                leave_request(url, endpoint, n)
                left += 2
                wait_idle(url)
                # before its first token: a long request holds the only running slot, the dropped one waits in the queue
                with httpx.stream("POST", url + "/v1/completions", json=body("/v1/completions", 1, True), timeout=30) as blocker:
                    blocker_lines = blocker.iter_lines()  # held: a dropped line iterator closes the connection
                    next(line for line in blocker_lines if line.startswith("data:"))
                    leave_stream(url, endpoint, n, data_lines=0)
                    # the server counts the abort when it sees the client go, having queued the request's add and then its
                    # abort for the engine, which applies its queue before each step: two steps later both show in the gauges
                    wait_for(lambda want=left + 1: value(url, "vllm:request_success_total", engine="0", finished_reason="abort") == want, "the abort")
                    tokens = value(url, "vllm:generation_tokens_total", engine="0")
                    wait_for(lambda want=tokens + 2: value(url, "vllm:generation_tokens_total", engine="0") >= want, "two engine steps")
                    assert value(url, "kvtier:num_requests_waiting") == 0 and value(url, "kvtier:num_requests_running") == 1
                left += 2
                wait_idle(url)
        assert value(url, "kvtier:kv_cache_usage_perc") == 0
        assert value(url, "kvtier:kv_cache_free_blocks") + value(url, "kvtier:kv_cache_cached_blocks") == total
        assert value(url, "vllm:request_success_total", engine="0", finished_reason="abort") == left
        # still serving, and correctly
        ok = httpx.post(url + "/v1/completions", json=body("/v1/completions", 2, False, max_tokens=4), timeout=30).json()
        assert [c["finish_reason"] for c in ok["choices"]] == ["length", "length"]
    finally:
        assert stop(proc) == 0
    log.seek(0)
    text = log.read()
    assert "Traceback" not in text and "ERROR" not in text, text
    aborted = [m.group(1) for m in ABORT_LINE.finditer(text)]
    assert len(aborted) == left, text  # one debug line per client that left
    assert len(set(aborted)) == left


def test_sigterm_ends_streams_in_flight_with_abort(model_dir):
    log = tempfile.NamedTemporaryFile("w+", suffix=".log")
    proc, url = start_server(str(model_dir), "--served-model-name", "tiny", "--shutdown-timeout", "2", log=log)
    events: list[list[dict]] = [[], []]

    def reader(k: int, endpoint: str) -> None:
        with httpx.stream("POST", url + endpoint, json=body(endpoint, 2, True, max_tokens=4000 - 64), timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events[k].append(line[6:])

    threads = [threading.Thread(target=reader, args=(k, e)) for k, e in enumerate(("/v1/completions", "/v1/chat/completions"))]
    for t in threads:
        t.start()
    while min(len(e) for e in events) < 5:
        time.sleep(0.05)
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert time.monotonic() - start < 2 + 10  # the grace period plus slack on a loaded machine
    for t in threads:
        t.join(30)
        assert not t.is_alive()
    for e in events:
        assert e[-1] == "[DONE]"
        reasons = {c["index"]: c["finish_reason"] for chunk in e[:-1] for c in json.loads(chunk)["choices"] if c["finish_reason"]}
        assert reasons == {0: "abort", 1: "abort"}
    log.seek(0)
    text = log.read()
    assert "Traceback" not in text and "ERROR" not in text, text


def test_vllm_dashboard_queries_find_data(model_dir):
    """The selectors of vLLM's Grafana dashboard (examples/online_serving/prometheus_grafana/grafana.json) match kvtier's samples."""
    proc, url = start_server(str(model_dir), "--served-model-name", "tiny", "--metric-names", "vllm")
    try:
        for _ in range(3):
            r = httpx.post(url + "/v1/completions", json=body("/v1/completions", 1, False, max_tokens=5), timeout=30)
            assert r.status_code == 200
        got = samples(url)
        vllm = {"model_name": "tiny", "engine": "0"}
        assert value(url, "vllm:num_requests_running", engine="0") == 0
        assert value(url, "vllm:kv_cache_usage_perc", engine="0") == 0
        assert value(url, "vllm:generation_tokens_total", engine="0") == 15
        ttft = {dict(labels)["le"]: v for (name, labels), v in got.items() if name == "vllm:time_to_first_token_seconds_bucket"}
        assert ttft["+Inf"] == 3 and all(dict(labels).items() >= vllm.items() for (name, labels) in got if name.startswith("vllm:"))
        assert value(url, "vllm:request_success_total", engine="0", finished_reason="length") == 3
        assert value(url, "vllm:request_generation_tokens_sum", engine="0") == 15
        assert not [name for name, _ in got if name.startswith("kvtier:")]  # only the names asked for
    finally:
        assert stop(proc) == 0
