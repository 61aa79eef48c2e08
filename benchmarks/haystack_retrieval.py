"""Retrieval by haystack kind: does a model find the needle in any text, or only in the filler it was trained on?

Runs passkey and multi-key needle (4 distractors) through kvtier's engine (greedy, fp32, each haystack
prefilled, the question forced through decode steps, then the answer decoded) for every haystack kind of ``kvtier.eval.haystacks`` (validation split),
with the training phrasings and with the held-out key phrases (``access-code``), at each context length.
Seed 1234 and depths spread over [0, 1], as the model cards. Prints a table; ``--json-out`` keeps every cell.

    python benchmarks/haystack_retrieval.py --model kvtier-tiny --json-out benchmarks/results/haystack-retrieval-kvtier-tiny.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from kvtier.entrypoints.llm import LLM
from kvtier.eval.haystacks import HAYSTACKS
from kvtier.eval.probe import run_engine_probe
from kvtier.machine import machine_line
from kvtier.models.embedded import resolve_model
from kvtier.training.data import TokenIds

PHRASINGS = {"passkey": ("landmark", "access-code"), "multikey": ("magic", "access-code")}


def run(args: argparse.Namespace) -> dict:
    """Every cell of the grid; with ``--json-out``, the file is rewritten after each cell, so a long run cut short keeps what it measured."""
    folder = Path(resolve_model(args.model))
    llm = LLM(str(folder), dtype="float32")
    ids = TokenIds(HFTokenizer.from_file(str(folder / "tokenizer.json")))
    cells: list[dict] = []
    result = {"machine": machine_line(), "model": args.model, "seed": args.seed, "trials": args.trials, "cells": cells}
    for task in args.tasks:
        for phrasing in PHRASINGS[task]:
            for haystack in args.haystacks:
                for n in args.contexts:
                    start = time.perf_counter()
                    r = run_engine_probe(llm, ids, task, n, args.trials, args.seed, haystack=haystack, phrasing=phrasing)
                    cells.append({"task": task, "phrasing": phrasing, "haystack": haystack, "context_tokens": n, "trials": r.trials,
                                  "accuracy": r.accuracy, "by_depth": r.by_depth})
                    print(f"{task:8} {phrasing:12} {haystack:8} {n:5}: {r.accuracy:4.0%}  ({time.perf_counter() - start:.0f} s)", flush=True)
                    if args.json_out:
                        args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def table(result: dict) -> str:
    """Markdown: a row per task and phrasing, a column per haystack, cells "512: a% / 2048: b%"."""
    cells = result["cells"]
    haystacks = list(dict.fromkeys(c["haystack"] for c in cells))
    rows = list(dict.fromkeys((c["task"], c["phrasing"]) for c in cells))
    lines = ["| task | phrasing | " + " | ".join(haystacks) + " |", "| --- | --- |" + " --- |" * len(haystacks)]
    for task, phrasing in rows:
        out = []
        for h in haystacks:
            out.append(" / ".join(f"{100 * c['accuracy']:.0f}%" for c in cells if (c["task"], c["phrasing"], c["haystack"]) == (task, phrasing, h)))
        lines.append(f"| {task} | {phrasing} | " + " | ".join(out) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="kvtier-tiny")
    p.add_argument("--tasks", nargs="+", default=list(PHRASINGS), choices=list(PHRASINGS))
    p.add_argument("--haystacks", nargs="+", default=list(HAYSTACKS), choices=list(HAYSTACKS))
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048])
    p.add_argument("--trials", type=int, default=100)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--json-out", type=Path)
    args = p.parse_args(argv)
    result = run(args)
    print(f"\n{result['machine']}; cells: {' / '.join(map(str, args.contexts))} tokens\n")
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
