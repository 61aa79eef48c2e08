"""The KV-method report's figures, every method beside the full cache in one run: accuracy on each task against budget
through the engine (``kvtier.eval.harness``: retrieval, common words, perplexity and agreement with the full cache), and
the memory effect under a fixed KV budget: how many 2K-token sequences decode at once in the memory of four full-cache
ones (``peak_decoding`` of benchmarks/sliding_window.py), their decode throughput, and the K/V bytes each decode token
reads. A method at budget 1.0 is the full cache (tests/kv_methods/test_eviction.py holds it to 1e-5), so the full-cache
column is every method's 100% point.

    python benchmarks/kv_methods_report.py --json-out benchmarks/results/kv-methods-cpu.json \
        --markdown-out benchmarks/results/kv-methods-cpu.md --plot-out benchmarks/results/kv-methods-cpu.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from report_io import write_report
from sliding_window import peak_decoding, random_prompts

from kvtier import LLM
from kvtier.eval.harness import EVAL_TASKS, markdown_table, run_eval
from kvtier.eval.plots import plot_scores
from kvtier.kv_methods.registry import KV_METHODS
from kvtier.machine import machine_line

METHODS = ("streamingllm", "h2o", "snapkv", "quest")  # the baselines, in the order the docs list them


def capacity(model: str, methods: list[str], budget: float, prompt_len: int, max_tokens: int, full_seqs: int, dtype: str) -> dict:
    """Most sequences decoding at once under the memory of ``full_seqs`` full-cache sequences, their throughput, and the
    K/V bytes read per output token, for the full cache and each method."""
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
        m = llm.get_metrics()
        out[name]["kv_bytes_read_per_output_token"] = round(m["kv_bytes_read"] / m["generation_tokens"])
        del llm
    return out


def capacity_table(mem: dict, methods: list[str]) -> str:
    lines = [f"Under a fixed KV budget: {mem['prompt_len']}-token prompts + {mem['max_tokens']} tokens, in {mem['kv_cache_memory']:,} bytes "
             f"(four full-cache sequences), each method keeping {mem['budget']:.0%}:", "",
             "| cache | requests | most decoding at once | x full | output tok/s | decode-only tok/s | K/V bytes read per output token |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name in ["none", *methods]:
        r = mem[name]
        lines.append(f"| {'full cache' if name == 'none' else name} | {r['requests']} | {r['peak_decoding']} | "
                     f"{r['peak_decoding'] / mem['none']['peak_decoding']:.2f} | {r['output_tokens_per_s']} | {r['decode_only_tokens_per_s']} | "
                     f"{r['kv_bytes_read_per_output_token']:,} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="kvtier-tiny")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=sorted(KV_METHODS))
    p.add_argument("--budgets", nargs="+", type=float, default=[0.125, 0.25, 0.5])
    p.add_argument("--tasks", nargs="+", default=["passkey", "multikey", "vartrack", "commonwords", "perplexity", "agreement"], choices=EVAL_TASKS)
    p.add_argument("--contexts", nargs="+", type=int, default=[1024, 2048, 4000])
    p.add_argument("--trials", type=int, default=6)
    p.add_argument("--haystack", default="heldout", help="held out of training: text neither the model nor its tokenizer saw")
    p.add_argument("--phrasing", default="secret-number", help="a needle wording no training document uses")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--capacity-budget", type=float, default=0.25)
    p.add_argument("--capacity-prompt-len", type=int, default=2048)
    p.add_argument("--json-out", type=Path)
    p.add_argument("--markdown-out", type=Path)
    p.add_argument("--plot-out", type=Path, help="score against budget, one line per method (PNG)")
    args = p.parse_args(argv)
    accuracy = run_eval(args.model, args.methods, None, args.budgets, args.tasks, args.contexts, args.trials, haystack=args.haystack,
                        phrasing=args.phrasing, dtype=args.dtype)
    mem = capacity(args.model, args.methods, args.capacity_budget, args.capacity_prompt_len, 32, 4, args.dtype)
    result = {"machine": machine_line(), "args": {k: str(v) for k, v in vars(args).items()}, "accuracy": accuracy, "capacity": mem}
    table = "\n\n".join([markdown_table(accuracy), capacity_table(mem, args.methods)])
    write_report(result, table, args.json_out, args.markdown_out)
    if args.plot_out:
        plot_scores([accuracy], args.plot_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
