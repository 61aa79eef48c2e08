"""Why ``kvtier serve`` builds its engine on the thread that steps it (``AsyncLLMEngine.from_engine_args``).

The same one-request decode, timed per token in three ways, each in a fresh process (OpenMP's thread teams live as long
as the process):

- main: the engine built and stepped on the main thread (what ``LLM.generate`` does);
- other thread: built on the main thread, stepped on another (what the server did before);
- own thread: built and stepped on the same non-main thread (what the server does now).

With libgomp every OS thread that starts parallel regions gets its own team of workers; two live teams make more
workers than cores, and libgomp then parks its workers after each region, so every one of a step's many parallel
regions pays a wake-up.

    python benchmarks/engine_thread.py --json-out benchmarks/results/engine-thread-cpu.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import reference_model  # noqa: E402

from kvtier import LLM, SamplingParams  # noqa: E402
from kvtier.machine import machine_line  # noqa: E402

MODES = ("main", "other thread", "own thread")


def per_token_ms(llm: LLM, prompt_len: int, tokens: int, trials: int) -> float:
    """Median over trials of (a generation of ``tokens`` minus a prefill-only one) per decoded token."""
    rng = random.Random(0)
    params = lambda n: SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)  # noqa: E731
    prompt = lambda: {"prompt_token_ids": [rng.randrange(100, 30000) for _ in range(prompt_len)]}  # noqa: E731
    llm.generate(prompt(), params(4), use_tqdm=False)  # warm-up
    out = []
    for _ in range(trials):
        start = time.perf_counter()
        llm.generate(prompt(), params(1), use_tqdm=False)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        llm.generate(prompt(), params(tokens + 1), use_tqdm=False)
        out.append(1e3 * (time.perf_counter() - start - prefill) / tokens)
    return statistics.median(out)


def measure(mode: str, model: str, args: argparse.Namespace) -> float:
    build = lambda: LLM(model, kv_cache_memory=1 << 30, enable_prefix_caching=False)  # noqa: E731
    if mode == "main":
        return per_token_ms(build(), args.prompt_len, args.tokens, args.trials)
    result: list[float] = []
    llm = build() if mode == "other thread" else None
    thread = threading.Thread(target=lambda: result.append(per_token_ms(llm or build(), args.prompt_len, args.tokens, args.trials)))
    thread.start()
    thread.join()
    return result[0]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt-len", type=int, default=300)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--mode", choices=MODES, help="measure one mode in this process (the script runs each in its own)")
    p.add_argument("--json-out", type=Path)
    args = p.parse_args(argv)
    model = str(reference_model(Path(".cache/reference-llama")))
    if args.mode:
        print(json.dumps({"mode": args.mode, "ms_per_token": measure(args.mode, model, args)}))
        return
    rows = []
    for mode in MODES:
        run = subprocess.run([sys.executable, __file__, "--mode", mode, "--prompt-len", str(args.prompt_len), "--tokens", str(args.tokens),
                              "--trials", str(args.trials)], capture_output=True, text=True, check=True)
        rows.append(json.loads(run.stdout.strip().splitlines()[-1]))
        print(f"{mode:>12}: {rows[-1]['ms_per_token']:.2f} ms per decoded token")
    result = {"machine": machine_line(), "model": model, "prompt_len": args.prompt_len, "tokens": args.tokens, "rows": rows}
    print(f"machine: {result['machine']}")
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
