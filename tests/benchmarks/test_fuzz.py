"""A few hundred of benchmarks/fuzz.py's schemathesis requests, in the suite: every route of the server's own
OpenAPI schema, valid and invalid bodies, and not one 5xx or error body outside OpenAI's shape."""

from __future__ import annotations

import argparse

import requests
from fuzz import malformed_error, run_fuzz


def response(status: int, body: bytes) -> requests.Response:
    r = requests.Response()
    r.status_code, r._content = status, body
    return r


def test_the_error_shape_check_catches_what_it_should():
    good = b'{"error": {"message": "n: must be >= 1", "type": "invalid_request_error", "param": "n", "code": 400}}'
    assert malformed_error(400, response(400, good)) is None
    assert malformed_error(404, response(404, good)) is not None  # code differs from the status
    assert malformed_error(400, response(400, b'{"detail": "Not Found"}')) is not None  # FastAPI's own shape
    assert malformed_error(400, response(400, b"Internal Server Error")) is not None
    assert malformed_error(400, response(400, b'{"error": {"message": "", "type": "x", "param": null, "code": 400}}')) is not None
    assert malformed_error(400, response(400, b'{"error": {"message": "m", "type": "x", "param": 3, "code": 400}}')) is not None


def test_three_hundred_schema_generated_requests_get_no_5xx_and_well_formed_errors():
    args = argparse.Namespace(model="kvtier-tiny", count=300, seconds=240.0, max_model_len=64, kv_cache_memory=1 << 24, seed=0)
    r = run_fuzz(args)
    assert r["requests"] >= 300
    assert r["server_errors"] == 0 and r["malformed_errors"] == 0, r["examples"]
    assert r["still_serving"] and r["exit_code"] == 0
    assert {"POST /v1/completions", "POST /v1/chat/completions", "POST /tokenize", "POST /detokenize"} <= set(r["by_route"])
    assert r["statuses"].get("200", 0) > 10 and r["statuses"].get("400", 0) > 10  # both valid and invalid bodies arrived
