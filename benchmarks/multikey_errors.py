"""Why a model misses multi-key needles: each wrong answer is classified against the haystack's needles.

Runs the model card's multi-key probe (same seeds, depths and decode-fed question) and sorts every answer:
right; another needle's value, split by whether that needle is the haystack's last (a recency bias); a
number that starts like one of the needles' values but goes on differently (the copy jumped to another
value mid-number); anything else. Compare two folders in one run, e.g. a shipped model and a retrained one:

    .venv/bin/python benchmarks/multikey_errors.py kvtier/embedded/kvtier-tiny path/to/other-folder
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

import torch

from kvtier.errors import InvalidArgumentError
from kvtier.eval.haystacks import HAYSTACKS
from kvtier.eval.probe import probe_replies
from kvtier.eval.retrieval import RetrievalSample
from kvtier.machine import machine_line
from kvtier.training.data import TokenIds
from kvtier.training.evaluation import load

NEEDLE = re.compile(r"The special magic number for (\S+) is (\d+)\.")
KINDS = ("right", "another needle, the last", "another needle, not the last", "starts like a needle, goes on differently", "other")
PREFIX_DIGITS = 3


def classify(sample: RetrievalSample, reply: str) -> str:
    """One of :data:`KINDS` for the first number in ``reply``."""
    values = [v for _, v in NEEDLE.findall(sample.context)]  # in haystack order
    match = re.search(r"\d+", reply)
    got = match.group(0) if match else ""
    if got == sample.answer[0]:
        return KINDS[0]
    if got in values:
        return KINDS[1] if values.index(got) == len(values) - 1 else KINDS[2]
    if got and any(v.startswith(got[:PREFIX_DIGITS]) for v in values):
        return KINDS[3]
    return KINDS[4]


def error_counts(folder: Path, context_tokens: int, trials: int, seed: int, haystack: str) -> Counter:
    model, tok = load(folder)
    replies = probe_replies(model, TokenIds(tok), tok.decode, "multikey", context_tokens, trials, seed, haystack=haystack)
    return Counter(classify(sample, reply) for sample, reply in replies)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="+", type=Path, help="HF model folders")
    p.add_argument("--context", type=int, default=2048, help="haystack tokens")
    p.add_argument("--trials", type=int, default=100)
    p.add_argument("--seed", type=int, default=1234, help="the model cards' seed")
    p.add_argument("--haystacks", nargs="+", default=["noise"], choices=list(HAYSTACKS), help="haystack kinds, a table each")
    p.add_argument("--threads", type=int, default=None)
    ns = p.parse_args()
    if ns.trials < 1:
        raise InvalidArgumentError("trials", f"must be >= 1, got {ns.trials}")
    if ns.threads:
        torch.set_num_threads(ns.threads)
    print(f"multi-key needle (4 distractors) at {ns.context} tokens, {ns.trials} trials, seed {ns.seed}; {machine_line()}")
    for haystack in ns.haystacks:
        counts = [error_counts(f, ns.context, ns.trials, ns.seed, haystack) for f in ns.folders]
        print(f"\nhaystack: {haystack}\n")
        print("| answer | " + " | ".join(str(f) for f in ns.folders) + " |")
        print("| --- |" + " --- |" * len(ns.folders))
        for kind in KINDS:
            print(f"| {kind} | " + " | ".join(str(c[kind]) for c in counts) + " |", flush=True)


if __name__ == "__main__":
    main()
