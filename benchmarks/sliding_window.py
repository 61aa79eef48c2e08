"""Sliding-window capacity: how many long sequences decode at once when a window's passed blocks go back to the pool.

The same random Mistral weights are built twice, with a sliding window in every layer and without one (full
attention), and each runs long greedy prompts under the same ``kv_cache_memory``: what ``--full-seqs`` full-attention
sequences of prompt + output tokens need. Reported: the most requests decoding at once (steady state: all past
their prompt), the most KV blocks in use, decode throughput, and the ratio window / full.

    python benchmarks/sliding_window.py --json-out benchmarks/results/sliding-window-cpu.json
    python benchmarks/sliding_window.py --hidden-size 64 --num-layers 2    # the size the test suite runs
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from kvtier.config import EngineArgs
from kvtier.engine.llm_engine import LLMEngine
from kvtier.engine.metrics import engine_metrics
from kvtier.machine import machine_line
from kvtier.models.checkpoint_builder import build_random_checkpoint
from kvtier.sampling_params import SamplingParams


def peak_decoding(engine: LLMEngine, prompts: list[list[int]], max_tokens: int) -> dict:
    """Run ``prompts`` greedily to ``max_tokens`` each; the most requests decoding at once, the most blocks in use, and
    the throughput overall and of the steps that only decode (no prompt chunk scheduled)."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    for p in prompts:
        engine.add_request({"prompt_token_ids": p}, params)
    peak = blocks = decode_tokens = 0
    decode_seconds = 0.0
    schedule, decode_step = engine.scheduler.schedule, [False]

    def watched():  # whether the step the scheduler plans holds decodes only (no prompt chunk)
        plan = schedule()
        decode_step[0] = bool(plan.chunks) and all(c.start >= c.seq.prompt_len for c in plan.chunks)
        return plan

    engine.scheduler.schedule = watched
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        before, t0 = engine.counters["generation_tokens"], time.perf_counter()
        engine.step()
        if decode_step[0]:
            decode_seconds += time.perf_counter() - t0
            decode_tokens += engine.counters["generation_tokens"] - before
        decoding = sum(all(s.num_computed_tokens >= s.prompt_len for s in r.live_seqs) for r in engine.scheduler.running)
        peak = max(peak, decoding)
        blocks = max(blocks, engine_metrics(engine, with_waste=False)["kv_blocks_used"])
    wall = time.perf_counter() - start
    left = engine_metrics(engine, with_waste=False)["kv_blocks_used"]
    return {"requests": len(prompts), "peak_decoding": peak, "peak_blocks": blocks, "blocks_left": left, "seconds": round(wall, 2),
            "output_tokens_per_s": round(len(prompts) * max_tokens / wall, 1),
            "decode_only_tokens_per_s": round(decode_tokens / decode_seconds, 1) if decode_seconds else None}


def random_prompts(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (length,), generator=g).tolist() for _ in range(count)]


def run(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        shape = dict(architecture="MistralForCausalLM", hidden_size=args.hidden_size, num_hidden_layers=args.num_layers, num_attention_heads=4,
                     num_key_value_heads=2, intermediate_size=2 * args.hidden_size, vocab_size=512, tokenizer_vocab_size=512,
                     max_position_embeddings=2 * (args.prompt_len + args.max_tokens), seed=args.seed)
        full = build_random_checkpoint(Path(tmp) / "full", **shape)
        window = build_random_checkpoint(Path(tmp) / "window", **shape, sliding_window=args.window)
        per_token = 2 * args.num_layers * 2 * (args.hidden_size // 4) * 4  # K+V, layers, KV heads, head_dim, fp32
        memory = args.full_seqs * (args.prompt_len + args.max_tokens) * per_token

        def engine(path: Path) -> LLMEngine:
            return LLMEngine(EngineArgs(model=str(path), kv_cache_memory=memory, enable_prefix_caching=False, dtype="float32"))

        full_run = peak_decoding(engine(full), random_prompts(2 * args.full_seqs, args.prompt_len, 512, args.seed), args.max_tokens)
        window_run = peak_decoding(engine(window), random_prompts(args.window_prompts, args.prompt_len, 512, args.seed), args.max_tokens)
    return {"machine": machine_line(), "window": args.window, "prompt_len": args.prompt_len, "max_tokens": args.max_tokens,
            "hidden_size": args.hidden_size, "num_layers": args.num_layers, "kv_cache_memory": memory, "full_attention": full_run,
            "sliding_window": window_run, "ratio": round(window_run["peak_decoding"] / max(1, full_run["peak_decoding"]), 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=4096)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--full-seqs", type=int, default=4, help="KV memory: what this many full-attention sequences need")
    p.add_argument("--window-prompts", type=int, default=64, help="prompts for the sliding-window run")
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", type=Path)
    args = p.parse_args(argv)
    result = run(args)
    print(json.dumps(result, indent=2))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
