"""The engine serving a multi-turn chat trace on kvtier-tiny-hybrid at a fixed cache budget, once per prefix-cache policy
(Marconi, SGLang+, vLLM+) and once with prefix caching off, all in one run: token hit rate, measured TTFT (median and
P95), evictions, and whether every greedy output equals the cold engine's. A hit is exact up to fp32 rounding (the
logits agree within 1e-4, tests/engine/test_state_prefix_cache.py), and a different batch can round differently too,
so where an output differs the report gives the cold run's margin between its two best tokens at the first
difference: a flip at a near tie (a margin of about 1e-5) is rounding; a wide margin would be a wrong state.

The trace is closed-loop chat: each session's turns come from the LMSys-like generator of kvtier.prefix.traces (its
user messages and output lengths, token ids folded into the model's vocabulary, lengths scaled by ``--scale``), and a
turn's prompt is the session's history as the model really wrote it (earlier prompts and its own greedy outputs) plus
the next user message, so a turn can resume after the previous turn's last computed token. ``--concurrency``
sessions are in flight at once; a session's next turn arrives as soon as its previous one ends.

    python benchmarks/prefix_engine.py --json-out benchmarks/results/prefix-engine.json \
        --markdown-out benchmarks/results/prefix-engine.md
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from statistics import median

from report_io import write_report

from kvtier import LLM, SamplingParams
from kvtier.machine import machine_line
from kvtier.prefix.traces import generate

POLICIES = ("marconi", "sglang+", "vllm+", "off")


def sessions(num_sessions: int, turns: int, scale: float, vocab: int, max_len: int, seed: int) -> list[list[tuple[list[int], int]]]:
    """Per session, its turns as (user message tokens, output length), cut where the history would pass ``max_len``."""
    records = generate("lmsys", num_sessions=num_sessions, seed=seed)
    out: dict[int, list[tuple[list[int], int]]] = {}
    prev: dict[int, int] = {}
    for r in sorted(records, key=lambda r: (r["session_id"], r["turn_id"])):
        sid = r["session_id"]
        message = r["input_tokens"][prev.get(sid, 0):]  # the new user turn (header included)
        prev[sid] = r["num_input_tokens"] + r["num_output_tokens"]
        keep = max(2, int(len(message) * scale))
        out.setdefault(sid, []).append(([3 + t % (vocab - 3) for t in message[:keep]], max(2, int(r["num_output_tokens"] * scale))))
    result = []
    for turns_of in out.values():
        total, kept = 0, []
        for message, n_out in turns_of[:turns]:
            total += len(message) + n_out
            if total > max_len:
                break
            kept.append((message, n_out))
        result.append(kept)
    return result


def serve(llm: LLM, trace: list[list[tuple[list[int], int]]], concurrency: int) -> dict:
    """Run the trace closed-loop; per request its TTFT and the tokens it generated, and the engine's counters."""
    engine = llm.engine
    history = [[] for _ in trace]
    next_turn = [0] * len(trace)
    outputs: dict[tuple[int, int], list[int]] = {}
    margins: dict[tuple[int, int], list[float]] = {}  # per step, the best token's logprob minus the second's
    ttft: list[float] = []
    owner: dict[str, tuple[int, int]] = {}

    def submit(s: int) -> None:
        message, n_out = trace[s][next_turn[s]]
        history[s] = history[s] + message
        params = SamplingParams(temperature=0.0, max_tokens=n_out, ignore_eos=True, logprobs=2)
        rid = engine.add_request({"prompt_token_ids": history[s]}, params)
        owner[rid] = (s, next_turn[s])
        next_turn[s] += 1

    llm.generate([{"prompt_token_ids": [5] * 40}], SamplingParams(max_tokens=2), use_tqdm=False)  # warm up before any timing
    active = [s for s in range(len(trace)) if trace[s]][:concurrency]
    waiting = [s for s in range(len(trace)) if trace[s]][concurrency:]
    for s in active:
        submit(s)
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        for out in engine.step():
            if not out.finished:
                continue
            s, t = owner.pop(out.request_id)
            outputs[(s, t)] = list(out.outputs[0].token_ids)
            margins[(s, t)] = [top[0] - top[1] for top in (sorted((lp.logprob for lp in step.values()), reverse=True) for step in out.outputs[0].logprobs)]
            ttft.append(out.metrics.time_to_first_token)
            history[s] = history[s] + outputs[(s, t)]
            if next_turn[s] < len(trace[s]):
                submit(s)
            elif waiting:
                submit(waiting.pop(0))
    wall = time.perf_counter() - start
    m = llm.get_metrics()
    ttft.sort()
    return {"requests": len(outputs), "wall_s": wall, "token_hit_rate": m["prefix_cache_hits"] / max(1, m["prefix_cache_queries"]),
            "ttft_median_ms": 1e3 * median(ttft), "ttft_p95_ms": 1e3 * ttft[min(len(ttft) - 1, round(0.95 * (len(ttft) - 1)))],
            "evictions": m.get("prefix_cache_evictions", 0), "states_held": m.get("prefix_cache_states", 0),
            "alpha": m.get("prefix_cache_alpha"), "preemptions": m["num_preemptions"], "outputs": {f"{s}/{t}": o for (s, t), o in outputs.items()},
            "margins": {f"{s}/{t}": o for (s, t), o in margins.items()}}


def row(name: str, r: dict) -> str:
    alpha = "" if r["alpha"] is None else r["alpha"]
    margin = "" if r["widest_margin_at_a_difference"] is None else f"{r['widest_margin_at_a_difference']:.1e}"
    return (f"| {name} | {r['requests']} | {100 * r['token_hit_rate']:.1f}% | {r['ttft_median_ms']:.1f} | {r['ttft_p95_ms']:.1f} | {r['evictions']} | "
            f"{r['states_held']} | {alpha} | {r['preemptions']} | {r['outputs_equal_cold']} of {r['requests']} | {margin} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="kvtier-tiny-hybrid")
    p.add_argument("--sessions", type=int, default=12)
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--scale", type=float, default=0.5, help="user-message and output lengths x this (a tiny model, a CPU)")
    p.add_argument("--max-len", type=int, default=2_048, help="a session stops before its history passes this many tokens")
    p.add_argument("--concurrency", type=int, default=4, help="sessions in flight at once")
    p.add_argument("--kv-cache-memory", type=int, default=24 << 20, help="bytes of K/V blocks and state slots, every policy alike")
    p.add_argument("--mamba-full-memory-ratio", type=float, default=0.5, help="state bytes over K/V bytes (room for checkpoints)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", type=Path)
    p.add_argument("--markdown-out", type=Path)
    args = p.parse_args(argv)
    for name in ("sessions", "turns", "concurrency", "kv_cache_memory", "max_len"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    results = {}
    for policy in POLICIES:
        kw = {"enable_prefix_caching": False} if policy == "off" else {"prefix_cache_policy": policy}
        llm = LLM(args.model, dtype="float32", kv_cache_memory=args.kv_cache_memory, mamba_full_memory_ratio=args.mamba_full_memory_ratio,
                  max_model_len=args.max_len + 64, seed=args.seed, **kw)
        trace = sessions(args.sessions, args.turns, args.scale, llm.engine.model_config.vocab_size, args.max_len, args.seed)
        results[policy] = serve(llm, trace, args.concurrency)
        print(policy, {k: v for k, v in results[policy].items() if k not in ("outputs", "margins")}, flush=True)
    cold, cold_margins = results["off"]["outputs"], results["off"]["margins"]
    for r in results.values():
        outs = r.pop("outputs")
        r.pop("margins")
        differ = {k: next(i for i, (x, y) in enumerate(zip(o + [None], cold[k] + [None])) if x != y) for k, o in outs.items() if o != cold[k]}
        r["outputs_equal_cold"] = len(outs) - len(differ)
        r["widest_margin_at_a_difference"] = max((cold_margins[k][i] for k, i in differ.items()), default=None)
    text = "\n".join([
        f"Machine: {machine_line()}. {args.model}, fp32, {args.sessions} sessions of up to {args.turns} turns, {args.concurrency} at once, "
        f"{args.kv_cache_memory >> 20} MiB of cache (mamba_full_memory_ratio {args.mamba_full_memory_ratio}).", "",
        "| policy | requests | token hit rate | TTFT median (ms) | TTFT P95 (ms) | evictions | states held at the end | alpha | preemptions | "
        "outputs = cold | cold's widest top-2 margin where one differs |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *(row(name, r) for name, r in results.items()),
    ])
    write_report({"machine": machine_line(), "args": {k: str(v) for k, v in vars(args).items()}, "results": results}, text, args.json_out,
                 args.markdown_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
