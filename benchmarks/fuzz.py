"""Fuzz ``kvtier serve`` from its own OpenAPI schema with schemathesis: valid and invalid requests to every
route, thousands of them, and count what a client must never see: a 5xx, or an error whose body is not
OpenAI's ``{"error": {"message", "type", "param", "code"}}`` with ``code`` equal to the HTTP status.

Bodies that could run long are kept short (``n`` at most 3, ``max_tokens`` / ``max_completion_tokens`` at
most 8) and the server's context is small (``--max-model-len``), so ten thousand requests take minutes.
The run is bounded by ``--count`` and by ``--seconds``; the server listens on loopback only.

    python benchmarks/fuzz.py --count 10000 --json-out benchmarks/results/fuzz-cpu.json   # the figures in docs/serving.md
    python benchmarks/fuzz.py --count 300                                                # what the test suite runs
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis.errors import Unsatisfiable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server_process import start_server, stop  # noqa: E402
from serving import write_json  # noqa: E402

from kvtier.machine import machine_line  # noqa: E402

SERVED_NAME = "fuzz"
CAPS = {"n": 3, "max_tokens": 8, "max_completion_tokens": 8}
ERROR_KEYS = {"message", "type", "param", "code"}


def malformed_error(status: int, response: requests.Response) -> str | None:
    """Why an error response is not in OpenAI's shape, or None when it is."""
    try:
        err = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return f"not an error object: {response.text[:200]!r}"
    if not isinstance(err, dict) or set(err) != ERROR_KEYS:
        return f"error keys {sorted(err) if isinstance(err, dict) else type(err).__name__}"
    if err["code"] != status or not isinstance(err["message"], str) or not err["message"] or not isinstance(err["type"], str):
        return f"bad fields {err}"
    if err["param"] is not None and not isinstance(err["param"], str):
        return f"param {err['param']!r}"
    return None


@dataclass
class Tally:
    sent: int = 0
    statuses: Counter = field(default_factory=Counter)
    by_route: Counter = field(default_factory=Counter)
    server_errors: list[str] = field(default_factory=list)
    malformed: list[str] = field(default_factory=list)


def cap(case: schemathesis.Case, mode: schemathesis.GenerationMode) -> None:
    """Keep a valid body cheap and aimed at the served model (a random name only ever gets a 404)."""
    if isinstance(case.body, dict):
        if mode == schemathesis.GenerationMode.POSITIVE and isinstance(case.body.get("model"), str):
            case.body["model"] = SERVED_NAME
        for key, most in CAPS.items():
            value = case.body.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > most:
                case.body[key] = most


@dataclass
class Fuzzer:
    """Sends generated requests to one server and tallies what comes back, until ``count`` or ``deadline``."""

    url: str
    count: int
    deadline: float
    tally: Tally = field(default_factory=Tally)
    session: requests.Session = field(default_factory=requests.Session)

    @property
    def done(self) -> bool:
        return self.tally.sent >= self.count or time.monotonic() > self.deadline

    def examples(self, op: schemathesis.APIOperation, mode: schemathesis.GenerationMode, n: int, rng_seed: int) -> None:
        """Up to ``n`` requests drawn for one route in one mode."""

        @seed(rng_seed)
        @settings(max_examples=n, deadline=None, database=None, phases=[Phase.generate], suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy(generation_mode=mode))
        def send(case: schemathesis.Case) -> None:
            if not self.done:
                cap(case, mode)
                self.check(op.label, case, case.call(base_url=self.url, session=self.session, timeout=60))

        try:
            send()
        except Unsatisfiable:
            pass  # nothing to negate in this route (GET /health in negative mode)

    def check(self, route: str, case: schemathesis.Case, response: requests.Response) -> None:
        t = self.tally
        t.sent += 1
        t.statuses[response.status_code] += 1
        t.by_route[route] += 1
        where = f"{route} {case.body!r:.300}"
        if response.status_code >= 500:
            t.server_errors.append(f"{response.status_code} {where}: {response.text[:200]}")
        elif response.status_code >= 400 and (why := malformed_error(response.status_code, response)):
            t.malformed.append(f"{why} at {where}")


def fuzz(url: str, count: int, seconds: float, rng_seed: int = 0) -> Tally:
    """Send at least ``count`` generated requests (or stop at ``seconds``), round after round over every route and mode."""
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    modes = list(schemathesis.GenerationMode)
    # routes with a body have far more to explore than GET /health: give them most of the examples
    weights = {op.label: 8 if op.method.upper() == "POST" else 1 for op in operations}
    per_unit = max(1, count // sum(weights[op.label] * len(modes) for op in operations))
    fuzzer = Fuzzer(url, count, time.monotonic() + seconds)
    rounds = 0
    while not fuzzer.done:
        sent_before = fuzzer.tally.sent
        for op in operations:
            for mode in modes:
                fuzzer.examples(op, mode, per_unit * weights[op.label], rng_seed * 1000 + rounds)
        rounds += 1
        if fuzzer.tally.sent == sent_before:
            break  # the routes have nothing more to give
    return fuzzer.tally


def run_fuzz(args: argparse.Namespace) -> dict:
    proc, url = start_server(args.model, "--served-model-name", SERVED_NAME, "--max-model-len", str(args.max_model_len),
                             "--kv-cache-memory", str(args.kv_cache_memory))
    t0 = time.monotonic()
    try:
        tally = fuzz(url, args.count, args.seconds, args.seed)
        wall = time.monotonic() - t0
        body = {"model": SERVED_NAME, "prompt": "def f(x):", "max_tokens": 4, "temperature": 0}
        still_serving = requests.post(url + "/v1/completions", json=body, timeout=60).status_code == 200
    finally:
        code = stop(proc)
    return {
        "machine": machine_line(), "model": args.model, "max_model_len": args.max_model_len, "seconds": round(wall, 1),
        "requests": tally.sent, "requests_per_second": round(tally.sent / wall, 1),
        "statuses": {str(k): v for k, v in sorted(tally.statuses.items())}, "by_route": dict(sorted(tally.by_route.items())),
        "server_errors": len(tally.server_errors), "malformed_errors": len(tally.malformed),
        "examples": (tally.server_errors + tally.malformed)[:10], "still_serving": still_serving, "exit_code": code,
    }


def print_result(r: dict) -> None:
    print(f"machine: {r['machine']}")
    print(f"{r['requests']} requests in {r['seconds']} s ({r['requests_per_second']}/s) to {r['model']} (max_model_len {r['max_model_len']})")
    print("statuses: " + ", ".join(f"{k}: {v}" for k, v in r["statuses"].items()))
    print("routes: " + ", ".join(f"{k}: {v}" for k, v in r["by_route"].items()))
    print(f"5xx: {r['server_errors']}, malformed error bodies: {r['malformed_errors']}, still serving: {r['still_serving']}, exit code {r['exit_code']}")
    for example in r["examples"]:
        print(f"  {example}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="kvtier-tiny", help="a shipped model's name or an HF checkpoint folder")
    p.add_argument("--count", type=int, default=10_000, help="requests to send")
    p.add_argument("--seconds", type=float, default=1800.0, help="stop sending after this long, whatever the count")
    p.add_argument("--max-model-len", type=int, default=64)
    p.add_argument("--kv-cache-memory", type=int, default=1 << 24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", type=Path, default=None)
    args = p.parse_args(argv)
    for name in ("count", "seconds", "max_model_len", "kv_cache_memory"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    result = run_fuzz(args)
    print_result(result)
    if args.json_out:
        write_json(args.json_out, result)
    ok = not result["server_errors"] and not result["malformed_errors"] and result["still_serving"] and result["exit_code"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
