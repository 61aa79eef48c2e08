"""Serving figures: ``kvtier serve`` (and, with ``--servers kvtier vllm``, ``vllm serve`` from vLLM's CPU build with the
same KV budget, token budget, prefix caching and fp32) with prefix caching on and off, each driven by ``serving.py`` at
several Poisson request rates (below, near and above saturation) with the same workload, prompts behind a few shared
prefixes. ``--repeats`` runs every cell that many times, the servers interleaved, and the summary gives each
server's median of the runs' median TTFT and mean TPOT, and kvtier's ratio to vLLM.

Every (server, prefix caching, rate, repeat) run gets a fresh server (a subprocess on a free loopback port, stopped with
SIGTERM and required to exit 0) and one warm-up request: a server kept across rates would answer later rates'
identical prompts from the previous run's prefix cache. Writes all results to one JSON file and prints a
markdown table. Token ids are drawn below the model's own ``vocab_size`` unless ``--vocab-size`` is given.

    python benchmarks/serving_sweep.py                      # reference model, rates 0.5,2,8, 100 prompts each: ~15 min on 2 cores
    python benchmarks/serving_sweep.py --request-rates 2,8 --num-prompts 50 --model path/to/hf-checkpoint
    python benchmarks/serving_sweep.py --servers kvtier vllm --prefix-caching on --repeats 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers.vllm_env import vllm_cpu_env  # noqa: E402
from server_process import start_server, stop  # noqa: E402
from serving import add_serving_args, run_benchmark, workload_for, write_json  # noqa: E402
from throughput import reference_model  # noqa: E402
from workload import Request, describe  # noqa: E402

from kvtier.machine import machine_line  # noqa: E402

SERVED_NAME = "bench"
WARMUP = Request(list(range(3, 35)), 4)  # consecutive ids: shares no KV block with the workload's random prompts


def server_flags(server: str, args: argparse.Namespace, caching: bool) -> tuple[list[str], dict[str, str]]:
    """The same engine settings in each server's own flags (vLLM-CPU takes its KV budget from the environment)."""
    flags = ["--served-model-name", SERVED_NAME, "--max-num-batched-tokens", str(args.max_num_batched_tokens),
             "--enable-prefix-caching" if caching else "--no-enable-prefix-caching"]
    if server == "kvtier":
        return [*flags, "--kv-cache-memory", str(int(args.kv_cache_gib * (1 << 30)))], {}
    return [*flags, "--dtype", "float32"], vllm_cpu_env(args.kv_cache_gib)


def run_once(model: str, args: argparse.Namespace, reqs: list[Request], caching: bool, rate: float, server: str = "kvtier") -> dict:
    flags, env = server_flags(server, args, caching)
    proc, url = start_server(model, *flags, server=server, env=env, wait_s=600.0 if server == "vllm" else 120.0)
    try:
        warm, _ = asyncio.run(run_benchmark(url, SERVED_NAME, [WARMUP], timeout=60, progress=False))
        if warm["failed"]:
            raise RuntimeError(f"warm-up request failed: {warm['errors'][0]}")
        summary, _ = asyncio.run(run_benchmark(url, SERVED_NAME, reqs, rate, args.max_concurrency, args.seed, args.timeout))
    finally:
        code = stop(proc)
    if code != 0 and server == "kvtier":
        raise RuntimeError(f"the server exited {code} on SIGTERM")
    return {"server": server, "prefix_caching": caching, "request_rate": rate, **summary}


def peer_summary(runs: list[dict]) -> list[str]:
    """Per (prefix caching, rate): each server's median over repeats of its median TTFT and mean TPOT, and kvtier / vLLM."""
    lines = ["| prefix caching | rate (req/s) | server | runs | TTFT median (ms) | TPOT mean (ms) | TTFT kvtier / vllm | TPOT kvtier / vllm |",
             "|---|---|---|---|---|---|---|---|"]
    cells = sorted({(r["prefix_caching"], r["request_rate"]) for r in runs}, key=lambda c: (not c[0], c[1]))
    for caching, rate in cells:
        med = {}
        for server in ("kvtier", "vllm"):
            rs = [r for r in runs if (r["server"], r["prefix_caching"], r["request_rate"]) == (server, caching, rate)]
            if rs:
                med[server] = (statistics.median(r["ttft"]["median_ms"] for r in rs), statistics.median(r["tpot"]["mean_ms"] for r in rs), len(rs))
        for server, (ttft, tpot, n) in med.items():
            ratio = (f"{ttft / med['vllm'][0]:.2f} | {tpot / med['vllm'][1]:.2f}" if server == "kvtier" and "vllm" in med else " | ")
            lines.append(f"| {'on' if caching else 'off'} | {rate:g} | {server} | {n} | {ttft:.0f} | {tpot:.1f} | {ratio} |")
    return lines


TABLE_HEAD = ("| server | prefix caching | rate (req/s) | done / failed | req/s | output tok/s | TTFT mean / median / P99 (ms) | TPOT mean / P99 (ms) "
              "| ITL P99 (ms) | E2E median (ms) |\n|---|---|---|---|---|---|---|---|---|---|")


def table_row(r: dict) -> str:
    def ms(key: str, *stats: str) -> str:
        return " / ".join("n/a" if r[key][f"{s}_ms"] is None else f"{r[key][f'{s}_ms']:.0f}" for s in stats)

    return (f"| {r.get('server', 'kvtier')} | {'on' if r['prefix_caching'] else 'off'} | {r['request_rate']:g} | {r['completed']} / {r['failed']} "
            f"| {r['request_throughput']:.2f} "
            f"| {r['output_throughput']:.1f} | {ms('ttft', 'mean', 'median', 'p99')} | {ms('tpot', 'mean', 'p99')} | {ms('itl', 'p99')} "
            f"| {ms('e2e', 'median')} |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF checkpoint folder (default: the throughput benchmark's reference Llama)")
    p.add_argument("--request-rates", default="0.5,2,8", help="comma-separated Poisson rates in req/s (inf: all at once)")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--kv-cache-gib", type=float, default=2.0)
    p.add_argument("--json-out", type=Path, default=Path("benchmarks/results/serving-cpu.json"))
    p.add_argument("--servers", nargs="+", choices=["kvtier", "vllm"], default=["kvtier"], help="servers to run, interleaved in each cell")
    p.add_argument("--prefix-caching", choices=["on", "off", "both"], default="both")
    p.add_argument("--repeats", type=int, default=1, help="runs of each (server, prefix caching, rate) cell")
    add_serving_args(p)
    p.set_defaults(num_prompts=100, shared_prefix_len=256, num_prefix_groups=4, vocab_size=None, timeout=600.0)
    args = p.parse_args(argv)
    try:
        rates = [float(x) for x in args.request_rates.split(",")]
        if not all(r > 0 for r in rates):
            raise ValueError
    except ValueError:
        p.error(f"--request-rates: must be comma-separated rates > 0 in req/s (inf: all at once), got {args.request_rates!r}")
    model = args.model or str(reference_model(Path(".cache/reference-llama")))
    args.vocab_size = args.vocab_size or json.loads((Path(model) / "config.json").read_text())["vocab_size"]
    reqs = workload_for(args)
    print(f"machine: {machine_line()}\nmodel: {model}\nworkload: {describe(reqs)}; shared prefix {args.shared_prefix_len} tokens x "
          f"{args.num_prefix_groups} groups\n\n{TABLE_HEAD}", flush=True)
    runs = []
    for caching in {"on": (True,), "off": (False,), "both": (True, False)}[args.prefix_caching]:
        for rate in rates:
            for _ in range(args.repeats):
                for server in args.servers:
                    runs.append(run_once(model, args, reqs, caching, rate, server))
                    print(table_row(runs[-1]), flush=True)
    if "vllm" in args.servers:
        print("\n" + "\n".join(peer_summary(runs)))
    write_json(args.json_out, {"machine": machine_line(), "model": model, "workload": describe(reqs), "settings": vars(args), "runs": runs})
    print(f"\nwrote {args.json_out}")


if __name__ == "__main__":
    main()
