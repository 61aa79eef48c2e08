"""Add the "through kvtier's engine" retrieval column to a shipped model's card, without retraining it.

The card's transformers figures stay as they are; the same samples (seed 1234, the card's trial count) are
answered by kvtier's engine and written into ``eval_results.json`` and the card, beside them. A retrained
model gets the column from ``kvtier train-tiny`` itself.

    python benchmarks/card_engine_retrieval.py --model kvtier-tiny
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch

from kvtier.machine import machine_line
from kvtier.models.embedded import resolve_model
from kvtier.training.model_card import CONTEXTS, add_engine_retrieval


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="kvtier-tiny", help="a shipped model's name or an HF folder with eval_results.json and README.md")
    p.add_argument("--trials", type=int, default=None, help="per cell (default: the card's)")
    p.add_argument("--contexts", type=int, nargs="+", default=list(CONTEXTS))
    args = p.parse_args(argv)
    from pathlib import Path

    folder = Path(resolve_model(args.model))
    trials = args.trials or json.loads((folder / "eval_results.json").read_text())["retrieval"][0]["trials"]
    torch.set_num_threads(torch.get_num_threads())
    start = time.perf_counter()
    note = (f"Measured by `python benchmarks/card_engine_retrieval.py --model {args.model}` on {machine_line()}; "
            f"Python {platform.python_version()}.")
    results = add_engine_retrieval(folder, trials, tuple(args.contexts), note)
    for cell in results["engine_retrieval"]:
        print(f"{cell['task']}@{cell['context_tokens']}: {cell['accuracy']:.0%}")
    print(f"{time.perf_counter() - start:.0f} s; card: {folder / 'README.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
