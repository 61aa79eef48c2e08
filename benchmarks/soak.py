"""Soak: ``kvtier serve`` under concurrent clients that complete or chat, stream or not, ask for n up to 3,
stop strings and seeds, and drop about a third of their streams mid-way, against a KV pool of a few sequences.

Every request is drawn from a fixed catalogue of greedy or seeded requests, and each is first sent alone,
so an answer that arrives whole under load must equal that answer, text for text. At the end the server must
be idle with every KV block back, its log must hold no traceback, no request may have failed, and a greedy
request must give the text it gave before the soak. The server's resident memory is sampled throughout; its
growth from a third of the way in to the end must stay under 10% (checked only with ``--check-memory``:
a one-minute run has no steady state to judge).

    python benchmarks/soak.py --duration 600 --check-memory --json-out benchmarks/results/soak-cpu.json
    python benchmarks/soak.py --duration 60 --clients 16      # what the test suite runs

Loopback only; every loop is bounded by ``--duration`` and every request by ``--request-timeout``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import httpx2 as httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server_process import start_server, stop  # noqa: E402
from serving import write_json  # noqa: E402

from kvtier.machine import machine_line  # noqa: E402

SERVED_NAME = "soak"
PROMPTS = ["def fibonacci(n):", "import os\n", "class Stack:\n    def __init__(self):", "for i in range(", "# Return the sum of a list\ndef total(",
           "def parse_args(argv):", "with open(path) as f:\n", "    return self._", "if __name__ == '__main__':", "try:\n    import json\nexcept"]
QUESTIONS = ["Write a loop.", "What does os.path.join do?", "Sort a list of numbers.", "hi", "Explain a dict comprehension."]
STOPS = [None, ["\n"], ["):", "\n\n"], ["return"]]
GROWTH_LIMIT = 0.10


@dataclass(frozen=True, eq=False)  # keyed by identity: the body is a dict
class Spec:
    """One request of the catalogue: greedy or seeded, so its answer is fixed whatever else runs."""

    endpoint: str
    body: dict

    def send(self, stream: bool) -> dict:
        return {**self.body, "model": SERVED_NAME, "stream": stream}


def catalogue(count: int, seed: int) -> list[Spec]:
    rng = random.Random(seed)
    specs = []
    for _ in range(count):
        greedy = rng.random() < 0.4
        body = {"n": rng.choice([1, 1, 2, 3]), "max_tokens": rng.randint(4, 96), "temperature": 0.0 if greedy else rng.choice([0.7, 1.0]),
                "seed": None if greedy else rng.randrange(1 << 30), "top_p": rng.choice([1.0, 0.95])}
        if stop := rng.choice(STOPS):
            body["stop"] = stop
        if greedy:
            body["n"] = 1  # n greedy copies are one answer n times: spend n on seeded requests
        if rng.random() < 0.5:
            specs.append(Spec("/v1/completions", {**body, "prompt": rng.choice(PROMPTS)}))
        else:
            specs.append(Spec("/v1/chat/completions", {**body, "messages": [{"role": "user", "content": rng.choice(QUESTIONS)}]}))
    return specs


def texts_of(endpoint: str, body: dict) -> dict[int, tuple[str, str]]:
    """A whole (non-streamed) answer as {choice index: (text, finish_reason)}."""
    key = "text" if endpoint == "/v1/completions" else "message"
    return {c["index"]: (c[key] if key == "text" else c[key]["content"], c["finish_reason"]) for c in body["choices"]}


@dataclass
class Tally:
    served: int = 0
    dropped: int = 0
    streamed: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    first_errors: list[str] = field(default_factory=list)

    def error(self, kind: str, detail: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1
        if len(self.first_errors) < 10:
            self.first_errors.append(f"{kind}: {detail[:300]}")


def difference(got: dict[int, tuple[str, str]], want: dict[int, tuple[str, str]]) -> str:
    """Where two answers first differ, for the error report."""
    if got.keys() != want.keys():
        return f"choices {sorted(got)} != {sorted(want)}"
    i = next(i for i in sorted(got) if got[i] != want[i])
    (a, ra), (b, rb) = got[i], want[i]
    k = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"choice {i} from character {k}: {a[k:k + 40]!r} ({ra}) != {b[k:k + 40]!r} ({rb}) alone"


async def read_stream(r: httpx.Response, endpoint: str, drop_after: int | None) -> dict[int, tuple[str, str]] | None:
    """The streamed answer assembled per choice, or None when this client drops it after ``drop_after`` events."""
    parts: dict[int, list[str]] = {}
    reasons: dict[int, str] = {}
    events = 0
    done = False
    async for line in r.aiter_lines():
        if not line.startswith("data: "):
            continue
        if drop_after is not None and events >= drop_after:
            return None
        events += 1
        if line == "data: [DONE]":
            done = True
            break
        for c in json.loads(line[6:])["choices"]:
            text = c.get("text", "") if endpoint == "/v1/completions" else c["delta"].get("content", "")
            parts.setdefault(c["index"], []).append(text or "")
            if c["finish_reason"]:
                reasons[c["index"]] = c["finish_reason"]
    if not done:
        raise ValueError("the stream ended without [DONE]")
    return {i: ("".join(p), reasons.get(i, "")) for i, p in parts.items()}


async def one_request(client: httpx.AsyncClient, url: str, spec: Spec, rng: random.Random, expected: dict, tally: Tally, args: argparse.Namespace) -> None:
    stream = rng.random() < 0.6
    drop_after = rng.randint(0, 6) if stream and rng.random() < args.drop_fraction else None
    timeout = args.request_timeout
    try:
        if not stream:
            r = await client.post(url + spec.endpoint, json=spec.send(False), timeout=timeout)
            if r.status_code != 200:
                tally.error(f"http {r.status_code}", r.text)
                return
            got = texts_of(spec.endpoint, r.json())
        else:
            async with client.stream("POST", url + spec.endpoint, json=spec.send(True), timeout=timeout) as r:
                if r.status_code != 200:
                    tally.error(f"http {r.status_code}", (await r.aread()).decode())
                    return
                got = await read_stream(r, spec.endpoint, drop_after)
            if got is None:
                tally.dropped += 1
                return
            tally.streamed += 1
    except (httpx.HTTPError, ValueError, KeyError) as e:
        tally.error(type(e).__name__, repr(e))
        return
    if got != expected[spec]:
        tally.error("answer differs from the same request sent alone", f"{spec.body}: {difference(got, expected[spec])}")
        return
    tally.served += 1


async def clients(url: str, specs: list[Spec], expected: dict, args: argparse.Namespace, tally: Tally) -> None:
    deadline = time.monotonic() + args.duration

    async def client(k: int) -> None:
        rng = random.Random(args.seed * 1000 + k)
        async with httpx.AsyncClient() as c:
            while time.monotonic() < deadline:
                await one_request(c, url, rng.choice(specs), rng, expected, tally, args)

    await asyncio.gather(*(client(k) for k in range(args.clients)))


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


async def sample_memory(pid: int, every: float, trace: list[tuple[float, float]], until: float) -> None:
    t0 = time.monotonic()
    while time.monotonic() < until:
        trace.append((round(time.monotonic() - t0, 1), round(rss_mib(pid), 1)))
        await asyncio.sleep(every)


def memory_growth(trace: list[tuple[float, float]], duration: float) -> float:
    """Resident memory at the end over the sample nearest a third of the way in, minus 1."""
    third = min(trace, key=lambda s: abs(s[0] - duration / 3))[1]
    return trace[-1][1] / third - 1


def metrics(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("kvtier:") and "{" in line:
            out[line.split("{")[0]] = float(line.rsplit(" ", 1)[1])
    return out


def wait_idle(url: str, timeout: float) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(url)
        if (m["kvtier:num_requests_running"] == 0 and m["kvtier:num_requests_waiting"] == 0) or time.monotonic() > deadline:
            return m
        time.sleep(0.1)


def greedy_probe(url: str) -> str:
    body = {"model": SERVED_NAME, "prompt": "def fibonacci(n):", "max_tokens": 32, "temperature": 0, "ignore_eos": True}
    return httpx.post(url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]


def kv_budget(model: str, tokens: int, dtype: str) -> int:
    """Bytes of KV cache that hold ``tokens`` tokens of ``model`` in ``dtype``."""
    from kvtier.models.config import ModelConfig, parse_dtype
    from kvtier.models.embedded import resolve_model
    from kvtier.models.loader import resolve_model_path

    cfg = ModelConfig.from_pretrained(resolve_model_path(resolve_model(model)))
    if dtype != "auto":
        cfg = replace(cfg, dtype=parse_dtype(dtype))
    return tokens * cfg.kv_bytes_per_token


def run_soak(args: argparse.Namespace) -> dict:
    log = tempfile.NamedTemporaryFile("w+", suffix=".log")
    flags = ["--served-model-name", SERVED_NAME, "--kv-cache-memory", str(kv_budget(args.model, args.kv_cache_tokens, args.dtype)),
             "--max-model-len", str(args.max_model_len), "--dtype", args.dtype, "--preemption-mode", args.preemption_mode]
    proc, url = start_server(args.model, *flags, log=log)
    try:
        free_at_start = metrics(url)
        blocks = free_at_start["kvtier:kv_cache_free_blocks"] + free_at_start["kvtier:kv_cache_cached_blocks"]
        greedy_before = greedy_probe(url)
        specs = catalogue(args.specs, args.seed)
        expected = {}
        for s in specs:  # each request alone, before any load
            r = httpx.post(url + s.endpoint, json=s.send(False), timeout=120)
            r.raise_for_status()
            expected[s] = texts_of(s.endpoint, r.json())
        tally = Tally()
        trace: list[tuple[float, float]] = []
        t0 = time.monotonic()

        async def soak() -> None:
            await asyncio.gather(clients(url, specs, expected, args, tally),
                                 sample_memory(proc.pid, args.memory_every, trace, time.monotonic() + args.duration))

        asyncio.run(soak())
        wall = time.monotonic() - t0
        trace.append((round(wall, 1), round(rss_mib(proc.pid), 1)))
        idle = wait_idle(url, 60)
        greedy_after = greedy_probe(url)
    finally:
        code = stop(proc)
    log.seek(0)
    lines = log.read().splitlines()
    growth = memory_growth(trace, args.duration)
    result = {
        "machine": machine_line(), "model": args.model, "dtype": args.dtype, "duration_s": round(wall, 1), "clients": args.clients,
        "catalogue": len(specs), "kv_blocks": int(blocks), "preemption_mode": args.preemption_mode,
        "served": tally.served, "streamed_whole": tally.streamed, "dropped": tally.dropped,
        "errors": tally.errors, "error_examples": tally.first_errors,
        "server_5xx": sum(v for k, v in tally.errors.items() if k.startswith("http 5")),
        "tracebacks": sum("Traceback" in line for line in lines), "error_log_lines": sum(line.startswith("ERROR") for line in lines),
        "idle_at_end": idle["kvtier:num_requests_running"] == 0 and idle["kvtier:num_requests_waiting"] == 0,
        "kv_blocks_back": idle["kvtier:kv_cache_free_blocks"] + idle["kvtier:kv_cache_cached_blocks"] == blocks and idle["kvtier:kv_cache_usage_perc"] == 0,
        "preemptions": idle["kvtier:num_preemptions_total"],
        "greedy_unchanged": greedy_before == greedy_after, "exit_code": code,
        "rss_mib_trace": trace, "rss_growth_after_first_third": round(growth, 4),
    }
    failures = [name for name, bad in [
        ("requests failed", bool(tally.errors)), ("tracebacks in the log", result["tracebacks"] > 0), ("ERROR lines in the log", result["error_log_lines"] > 0),
        ("not idle at the end", not result["idle_at_end"]), ("KV blocks missing", not result["kv_blocks_back"]),
        ("greedy output changed", not result["greedy_unchanged"]), ("server exit code", code != 0),
        (f"memory grew over {GROWTH_LIMIT:.0%}", args.check_memory and growth >= GROWTH_LIMIT)] if bad]
    result["failures"] = failures
    return result


def print_result(r: dict) -> None:
    print(f"machine: {r['machine']}")
    print(f"{r['duration_s']} s, {r['clients']} clients, {r['catalogue']} distinct requests, {r['kv_blocks']} KV blocks, "
          f"{r['preemptions']:.0f} preemptions ({r['preemption_mode']})")
    print(f"served {r['served']} (streamed whole {r['streamed_whole']}), dropped by clients {r['dropped']}, errors {sum(r['errors'].values())} {r['errors']}")
    print(f"5xx {r['server_5xx']}, tracebacks {r['tracebacks']}, ERROR log lines {r['error_log_lines']}, idle {r['idle_at_end']}, "
          f"KV blocks back {r['kv_blocks_back']}, greedy unchanged {r['greedy_unchanged']}, exit code {r['exit_code']}")
    for example in r["error_examples"]:
        print(f"  {example}")
    print("resident memory (s: MiB): " + ", ".join(f"{t:g}: {m:g}" for t, m in r["rss_mib_trace"]))
    print(f"growth from a third of the way in to the end: {r['rss_growth_after_first_third']:+.1%}")
    print("PASS" if not r["failures"] else f"FAIL: {', '.join(r['failures'])}")


def add_soak_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="kvtier-tiny", help="a shipped model's name or an HF checkpoint folder")
    p.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    p.add_argument("--clients", type=int, default=24, help="concurrent clients, each sending one request after another")
    p.add_argument("--specs", type=int, default=48, help="distinct requests in the catalogue")
    p.add_argument("--kv-cache-tokens", type=int, default=384, help="the KV pool, in tokens (a few sequences: requests are preempted often)")
    p.add_argument("--preemption-mode", default="recompute", choices=["recompute", "swap"])
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--drop-fraction", type=float, default=1 / 3, help="share of streams the client drops after 0-6 events")
    p.add_argument("--request-timeout", type=float, default=300.0)
    p.add_argument("--memory-every", type=float, default=5.0, help="seconds between resident-memory samples")
    p.add_argument("--check-memory", action="store_true", help=f"fail when memory grows {GROWTH_LIMIT:.0%} or more after the first third")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", type=Path, default=None)


def check_args(args: argparse.Namespace) -> None:
    for name in ("duration", "clients", "specs", "kv_cache_tokens", "max_model_len", "request_timeout", "memory_every"):
        if getattr(args, name) <= 0:
            raise SystemExit(f"soak.py: error: --{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_soak_args(p)
    args = p.parse_args(argv)
    check_args(args)
    result = run_soak(args)
    print_result(result)
    if args.json_out:
        write_json(args.json_out, result)
    return 0 if not result["failures"] else 1


if __name__ == "__main__":
    sys.exit(main())
