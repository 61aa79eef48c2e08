"""Online serving benchmark against any OpenAI-compatible server, in the manner of vLLM's ``benchmark_serving``.

Replays a fixed-seed ShareGPT-like workload (``workload.py``) as streaming ``/v1/completions`` requests
whose prompts are token ids and whose outputs run to their drawn length (``ignore_eos``, greedy), so
every run asks for exactly the same tokens. Requests leave at a Poisson rate (``--request-rate``; ``inf``
sends them all at once) and/or under a concurrency cap (``--max-concurrency``). ``--shared-prefix-len``
prepends one of ``--num-prefix-groups`` fixed prefixes to every prompt, as a shared system prompt would,
so prefix caching has something to hit. Reports request and token throughput and the mean, median and
P99 of TTFT (time to first token), TPOT (time per output token after the first), ITL (gap between
streamed chunks) and E2E latency, and counts every error. Loopback URLs only; bounded by ``--timeout``.

    kvtier serve --model .cache/reference-llama --port 8000 &
    python benchmarks/serving.py --request-rate 4 --num-prompts 200 --json-out serving.json
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx2 as httpx
import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workload import Request, add_workload_args, describe, make_workload  # noqa: E402

from kvtier.machine import machine_line  # noqa: E402


@dataclass
class RequestResult:
    prompt_tokens: int
    sent: float = math.nan  # seconds from the start of the run to this request's POST
    output_tokens: int = 0
    ttft: float = math.nan  # seconds from the POST to the first chunk with tokens
    e2e: float = math.nan
    itl: list[float] = field(default_factory=list)  # gaps between successive chunks with tokens
    error: str | None = None


def check_args(base_url: str, request_rate: float, max_concurrency: int | None) -> None:
    """Load tests here may only reach this machine: refuse any host that is not loopback."""
    host = urlparse(base_url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"--base-url: load tests are loopback only (127.0.0.0/8, ::1 or localhost), got host {host!r} in {base_url!r}")
    if not request_rate > 0:
        raise ValueError(f"--request-rate: must be > 0 (inf sends all at once), got {request_rate}")
    if max_concurrency is not None and max_concurrency < 1:
        raise ValueError(f"--max-concurrency: must be >= 1, got {max_concurrency}")


def send_offsets(n: int, request_rate: float, seed: int) -> list[float]:
    """Seconds after the start at which each request leaves: exponential gaps make a Poisson process."""
    if math.isinf(request_rate):
        return [0.0] * n
    return np.cumsum(np.random.default_rng(seed).exponential(1.0 / request_rate, n)).tolist()


def with_shared_prefixes(reqs: list[Request], prefix_len: int, groups: int, vocab_size: int, seed: int) -> list[Request]:
    """Prepend one of ``groups`` fixed random prefixes, round-robin; drawn apart from the workload's own rng."""
    if prefix_len == 0:
        return reqs
    rng = np.random.default_rng([seed, 1])
    prefixes = [rng.integers(3, vocab_size, prefix_len).tolist() for _ in range(groups)]
    return [Request(prefixes[i % groups] + r.prompt_token_ids, r.output_len) for i, r in enumerate(reqs)]


async def send(client: httpx.AsyncClient, base_url: str, model: str, req: Request, t0: float) -> RequestResult:
    """One streamed completion, timed. A chunk with choices is a token step: the server sends one per engine
    output with new tokens, even when their text is still empty (an incomplete UTF-8 sequence), so non-empty
    text would undercount."""
    body = {"model": model, "prompt": req.prompt_token_ids, "max_tokens": req.output_len, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    result = RequestResult(prompt_tokens=len(req.prompt_token_ids))
    start = last = time.perf_counter()
    result.sent = start - t0
    chunks = 0
    try:
        async with client.stream("POST", base_url + "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                result.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:200]}"
                return result
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                now = time.perf_counter()
                chunk = json.loads(line[len("data: "):])
                if chunk.get("usage"):
                    result.prompt_tokens, result.output_tokens = chunk["usage"]["prompt_tokens"], chunk["usage"]["completion_tokens"]
                if not chunk.get("choices"):
                    continue
                chunks += 1
                if chunks == 1:
                    result.ttft = now - start
                else:
                    result.itl.append(now - last)
                last = now
        result.e2e = time.perf_counter() - start
        result.output_tokens = result.output_tokens or chunks
    except Exception as e:  # any failure of one request is a counted error, never the end of the run
        result.error = f"{type(e).__name__}: {e}"
    return result


def stats(values: list[float]) -> dict[str, float | None]:
    """Mean, median and P99 in milliseconds (None when there is nothing to measure)."""
    if not values:
        return {"mean_ms": None, "median_ms": None, "p99_ms": None}
    a = np.asarray(values) * 1000
    return {"mean_ms": float(a.mean()), "median_ms": float(np.median(a)), "p99_ms": float(np.percentile(a, 99))}


def summarize(results: list[RequestResult], duration: float) -> dict:
    ok = [r for r in results if r.error is None]
    prompt, out = sum(r.prompt_tokens for r in ok), sum(r.output_tokens for r in ok)
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    return {
        "completed": len(ok), "failed": len(results) - len(ok), "errors": [r.error for r in results if r.error][:5],
        "duration_s": duration, "prompt_tokens": prompt, "output_tokens": out,
        "request_throughput": len(ok) / duration, "output_throughput": out / duration, "total_token_throughput": (prompt + out) / duration,
        "ttft": stats([r.ttft for r in ok]), "tpot": stats(tpot), "itl": stats([g for r in ok for g in r.itl]), "e2e": stats([r.e2e for r in ok]),
    }


async def run_benchmark(base_url: str, model: str | None, reqs: list[Request], request_rate: float = math.inf, max_concurrency: int | None = None,
                        seed: int = 0, timeout: float = 1800.0, progress: bool = True) -> tuple[dict, list[RequestResult]]:
    """Replay ``reqs`` against ``base_url``; returns the summary and each request's result, in order.

    ``model`` None asks GET /v1/models for the first id. Requests still running ``timeout`` seconds after
    the start are cancelled and counted as errors.
    """
    check_args(base_url, request_rate, max_concurrency)
    cap = max_concurrency or len(reqs)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout), limits=httpx.Limits(max_connections=cap, max_keepalive_connections=cap)) as client:
        if model is None:
            model = (await client.get(base_url + "/v1/models")).raise_for_status().json()["data"][0]["id"]
        gate = asyncio.Semaphore(cap)
        bar = tqdm(total=len(reqs), desc="requests", disable=not progress, leave=False)
        t0 = time.perf_counter()

        async def scheduled(req: Request, offset: float) -> RequestResult:
            await asyncio.sleep(t0 + offset - time.perf_counter())
            async with gate:
                result = await send(client, base_url, model, req, t0)
            bar.update(1)
            return result

        tasks = [asyncio.create_task(scheduled(r, o)) for r, o in zip(reqs, send_offsets(len(reqs), request_rate, seed))]
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        duration = time.perf_counter() - t0
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        bar.close()
    results = [RequestResult(len(r.prompt_token_ids), error=f"not finished within --timeout {timeout:g} s") if t.cancelled() else t.result()
               for t, r in zip(tasks, reqs)]
    return summarize(results, duration), results


def print_summary(s: dict) -> None:
    """A vLLM-style result table."""
    rows = [("Successful requests", s["completed"]), ("Failed requests", s["failed"]), ("Benchmark duration (s)", f"{s['duration_s']:.2f}"),
            ("Total input tokens", s["prompt_tokens"]), ("Total generated tokens", s["output_tokens"]),
            ("Request throughput (req/s)", f"{s['request_throughput']:.2f}"), ("Output token throughput (tok/s)", f"{s['output_throughput']:.1f}"),
            ("Total token throughput (tok/s)", f"{s['total_token_throughput']:.1f}")]
    print(f"{' Serving Benchmark Result ':=^56}")
    for name, value in rows:
        print(f"{name + ':':<40}{value:>16}")
    for key, title in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)"), ("itl", "Inter-token Latency"),
                       ("e2e", "End-to-end Latency")):
        print(f"{' ' + title + ' ':-^56}")
        for stat in ("mean", "median", "p99"):
            v = s[key][f"{stat}_ms"]
            print(f"{f'{stat.capitalize()} {key.upper()} (ms):':<40}{'n/a' if v is None else f'{v:.2f}':>16}")
    print("=" * 56)
    for e in s["errors"]:
        print(f"error: {e}")


def write_json(path: Path, record: dict) -> None:
    """Strict JSON (an infinite rate becomes the string "inf"), so jq and other strict readers take the results too."""
    def strict(v):
        if isinstance(v, float) and not math.isfinite(v):
            return str(v)
        if isinstance(v, dict):
            return {k: strict(x) for k, x in v.items()}
        return [strict(x) for x in v] if isinstance(v, list) else v

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(strict(record), indent=2, default=str) + "\n")


def add_serving_args(p: argparse.ArgumentParser) -> None:
    """Flags shared with serving_sweep.py: the workload, its shared prefixes and how requests are sent."""
    p.add_argument("--max-concurrency", type=int, default=None, help="at most this many requests in flight")
    p.add_argument("--shared-prefix-len", type=int, default=0, help="tokens of a fixed random prefix prepended to every prompt")
    p.add_argument("--num-prefix-groups", type=int, default=1, help="distinct shared prefixes, assigned round-robin")
    p.add_argument("--vocab-size", type=int, default=32000, help="token ids are drawn from [3, vocab-size); 32000 is the reference model's")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds the whole run may take; requests still running then count as errors")
    add_workload_args(p)


def workload_for(args: argparse.Namespace) -> list[Request]:
    return with_shared_prefixes(make_workload(args, args.vocab_size), args.shared_prefix_len, args.num_prefix_groups, args.vocab_size, args.seed)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server (loopback only)")
    p.add_argument("--model", default=None, help="model name to send (default: the first id of GET /v1/models)")
    p.add_argument("--label", default="", help="free text stored with the results")
    p.add_argument("--json-out", type=Path, default=None)
    p.add_argument("--request-rate", type=float, default=math.inf, help="requests per second, Poisson arrivals (inf: all at once)")
    add_serving_args(p)
    args = p.parse_args(argv)
    try:
        check_args(args.base_url, args.request_rate, args.max_concurrency)
    except ValueError as e:
        p.error(str(e))
    reqs = workload_for(args)
    print(f"machine: {machine_line()}\nworkload: {describe(reqs)}\nsettings: {args.base_url}, rate {args.request_rate:g} req/s, "
          f"max concurrency {args.max_concurrency}, shared prefix {args.shared_prefix_len} x {args.num_prefix_groups}")
    summary, _ = asyncio.run(run_benchmark(args.base_url, args.model, reqs, args.request_rate, args.max_concurrency, args.seed, args.timeout))
    print_summary(summary)
    if args.json_out:
        write_json(args.json_out, {"machine": machine_line(), "label": args.label, "settings": vars(args), "workload": describe(reqs), **summary})


if __name__ == "__main__":
    main()
