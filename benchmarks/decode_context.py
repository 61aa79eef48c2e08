"""Decode time per token and memory per sequence against context length: a hybrid's Mamba2 state costs the same
at every length, attention's K/V grows with it.

Runs the two shipped models side by side, same tokenizer, width and heads: kvtier-tiny-hybrid (2 attention layers
among 6 Mamba2 layers) and kvtier-tiny (6 attention layers). For each context length, ``--batch`` sequences of
random tokens are prefilled to the context less ``--decode-tokens``, then decode that many tokens greedily. Reported
per model and length: the decode steps' wall time per step and per token (a step makes one token for each
sequence; the median of ``--repeats`` runs, the models alternating), and the cache each sequence holds once its
prompt is in (K/V blocks and state slot, from the engine's ``cache_bytes_used``).

    python benchmarks/decode_context.py --json-out benchmarks/results/decode-context-cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from kvtier.config import EngineArgs
from kvtier.engine.llm_engine import LLMEngine
from kvtier.engine.metrics import engine_metrics
from kvtier.machine import machine_line
from kvtier.sampling_params import SamplingParams

MODELS = ("kvtier-tiny-hybrid", "kvtier-tiny")


def measure(engine: LLMEngine, prompts: list[list[int]], decode_tokens: int) -> dict:
    """Prefill ``prompts``, then time the steps in which every sequence decodes."""
    params = SamplingParams(temperature=0, max_tokens=decode_tokens, ignore_eos=True)
    for p in prompts:
        engine.add_request({"prompt_token_ids": p}, params)
    seqs = lambda: [s for r in engine.scheduler.running for s in r.live_seqs]  # noqa: E731
    while len(seqs()) < len(prompts) or any(s.num_computed_tokens < s.prompt_len for s in seqs()):
        engine.step()
    held = engine_metrics(engine, with_waste=False)["cache_bytes_used"]
    steps, start = 0, time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
    step_ms = (time.perf_counter() - start) / steps * 1e3
    return {"decode_steps": steps, "ms_per_step": round(step_ms, 3), "ms_per_token": round(step_ms / len(prompts), 3),
            "cache_bytes_per_sequence": held // len(prompts)}


def run(args: argparse.Namespace) -> dict:
    """Both engines built once; at each length each model runs ``--repeats`` times, alternating, and keeps its median
    step time, so drift in the machine's speed touches both alike."""
    g = torch.Generator().manual_seed(args.seed)
    engines = {name: LLMEngine(EngineArgs(model=name, dtype=args.dtype, enable_prefix_caching=False, max_num_seqs=args.batch,
                                          kv_cache_memory=int(args.kv_cache_gib * (1 << 30)))) for name in MODELS}
    rows = {}
    for name, engine in engines.items():
        metrics = engine_metrics(engine, with_waste=False)
        rows[name] = {"attention_layers": len(engine.model_config.attention_layers), "kv_bytes_per_token": metrics["kv_bytes_per_token"],
                      "state_bytes_per_sequence": metrics.get("mamba_bytes_per_slot", 0), "contexts": {}}
    vocab = min(e.model_config.vocab_size for e in engines.values())
    for context in args.contexts:
        runs: dict[str, list[dict]] = {name: [] for name in MODELS}
        for _ in range(args.repeats):
            prompts = [torch.randint(3, vocab, (context - args.decode_tokens,), generator=g).tolist() for _ in range(args.batch)]
            for name in MODELS:
                runs[name].append(measure(engines[name], prompts, args.decode_tokens))
        for name in MODELS:
            best = sorted(runs[name], key=lambda r: r["ms_per_step"])[len(runs[name]) // 2]
            rows[name]["contexts"][context] = {**best, "ms_per_step_runs": [r["ms_per_step"] for r in runs[name]]}
            print(name, context, rows[name]["contexts"][context], flush=True)
    hybrid, llama = (rows[m]["contexts"] for m in MODELS)
    ratios = {c: {"time_hybrid_over_attention": round(hybrid[c]["ms_per_token"] / llama[c]["ms_per_token"], 3),
                  "memory_hybrid_over_attention": round(hybrid[c]["cache_bytes_per_sequence"] / llama[c]["cache_bytes_per_sequence"], 3)}
              for c in args.contexts}
    return {"machine": machine_line(), "args": {k: str(v) for k, v in vars(args).items()}, "models": rows, "ratios": ratios}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096], help="tokens per sequence at the last decode step")
    p.add_argument("--decode-tokens", type=int, default=64, help="tokens decoded after each prompt (timed)")
    p.add_argument("--repeats", type=int, default=3, help="runs per model and length; the median step time is reported")
    p.add_argument("--batch", type=int, default=8, help="sequences decoding together")
    p.add_argument("--dtype", default="auto", help="the models' dtype (auto: as shipped, bfloat16)")
    p.add_argument("--kv-cache-gib", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", type=Path, default=None)
    args = p.parse_args(argv)
    if min(args.contexts) <= args.decode_tokens:
        p.error(f"--contexts must each exceed --decode-tokens ({args.decode_tokens})")
    result = run(args)
    print(json.dumps(result["ratios"], indent=1))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
