"""The KV-method report's figures, each method beside the full cache in the same run: retrieval accuracy against
budget through the engine (``kvtier.eval.harness``), and the memory effect, how many 2K-token sequences decode at
once in the memory of four full-cache ones (``peak_decoding`` of benchmarks/sliding_window.py).

    python benchmarks/kv_methods_report.py --json-out benchmarks/results/kv-methods-cpu.json --markdown-out benchmarks/results/kv-methods-cpu.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sliding_window import peak_decoding, random_prompts

from kvtier import LLM
from kvtier.eval.harness import markdown_table, run_eval
from kvtier.eval.plots import plot_scores
from kvtier.eval.retrieval import TASKS
from kvtier.kv_methods.registry import KV_METHODS
from kvtier.machine import machine_line


def capacity(model: str, methods: list[str], budget: float, prompt_len: int, max_tokens: int, full_seqs: int, dtype: str) -> dict:
    """Most sequences decoding at once under the memory of ``full_seqs`` full-cache sequences, for the full cache and each method."""
    probe = LLM(model, dtype=dtype, kv_cache_memory=1 << 20)
    per_token, vocab = probe.engine.memory_plan.bytes_per_token, probe.engine.model_config.vocab_size
    del probe
    memory = full_seqs * (prompt_len + max_tokens) * per_token
    out = {"kv_cache_memory": memory, "prompt_len": prompt_len, "max_tokens": max_tokens, "budget": budget}
    for name in ["none", *methods]:
        kw = {} if name == "none" else {"kv_method": name, "kv_method_config": {"budget": budget}}
        llm = LLM(model, dtype=dtype, kv_cache_memory=memory, enable_prefix_caching=False, **kw)
        count = 2 * full_seqs if name == "none" else 6 * full_seqs
        out[name] = peak_decoding(llm.engine, random_prompts(count, prompt_len, vocab, seed=0), max_tokens)
        del llm
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="kvtier-tiny")
    p.add_argument("--methods", nargs="+", default=sorted(KV_METHODS), choices=sorted(KV_METHODS))
    p.add_argument("--budgets", nargs="+", type=float, default=[0.125, 0.25, 0.5, 1.0])
    p.add_argument("--tasks", nargs="+", default=["passkey", "multikey"], choices=TASKS)
    p.add_argument("--contexts", nargs="+", type=int, default=[1024, 2048, 4000])
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--capacity-budget", type=float, default=0.25)
    p.add_argument("--capacity-prompt-len", type=int, default=2048)
    p.add_argument("--json-out", type=Path)
    p.add_argument("--markdown-out", type=Path)
    p.add_argument("--plot-out", type=Path, help="score against budget, one line per method (PNG)")
    args = p.parse_args(argv)
    accuracy = [run_eval(args.model, m, None, args.budgets, args.tasks, args.contexts, args.trials, dtype=args.dtype) for m in args.methods]
    mem = capacity(args.model, args.methods, args.capacity_budget, args.capacity_prompt_len, 32, 4, args.dtype)
    result = {"machine": machine_line(), "args": {k: str(v) for k, v in vars(args).items()}, "accuracy": accuracy, "capacity": mem}
    cap = [f"Sequences decoding at once, {mem['prompt_len']}-token prompts + {mem['max_tokens']} tokens, in {mem['kv_cache_memory']:,} bytes "
           f"(four full-cache sequences), budget {mem['budget']}:", "", "| cache | most decoding at once | x full |", "| --- | --- | --- |"]
    for name in ["none", *args.methods]:
        n = mem[name]["peak_decoding"]
        cap.append(f"| {'full cache' if name == 'none' else name} | {n} | {n / mem['none']['peak_decoding']:.2f} |")
    table = "\n\n".join([*(markdown_table(a) for a in accuracy), "\n".join(cap)])
    print(table)
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=1) + "\n")
    if args.markdown_out:
        args.markdown_out.write_text(table + "\n")
    if args.plot_out:
        plot_scores(accuracy, args.plot_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
