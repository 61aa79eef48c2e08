"""Does kvtier's engine answer a model card's retrieval samples as transformers does? Sample by sample.

The card reports each backend's accuracy per cell; two equal accuracies can still hide different answers. This
runs one cell's samples (the card's protocol: seed, trials, the question fed through decode steps, greedy answers
of the card's length, fp32 on both sides) through both backends and counts the samples where one is right and the
other wrong, and the samples whose replies differ at all (the engine stops at end-of-sequence, the transformers
loop runs the card's answer length past it, so a reply differs where the transformers one does not start with the
engine's).

    python benchmarks/engine_agreement.py --model kvtier-tiny-hybrid --json-out benchmarks/results/engine-agreement-kvtier-tiny-hybrid.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from kvtier.entrypoints.llm import LLM
from kvtier.eval.haystacks import HAYSTACKS
from kvtier.eval.probe import engine_replies, probe_replies
from kvtier.eval.retrieval import TASKS
from kvtier.machine import machine_line
from kvtier.models.embedded import resolve_model
from kvtier.training.data import TokenIds
from kvtier.training.evaluation import ANSWER_TOKENS, HELD_OUT_CONTEXT, load


def agreement(folder: Path, task: str, haystack: str, context: int, trials: int, seed: int) -> dict:
    model, tok = load(folder)
    ids = TokenIds(tok)
    start = time.perf_counter()
    engine = engine_replies(LLM(str(folder), dtype="float32"), ids, task, context, trials, seed, ANSWER_TOKENS, haystack=haystack)
    engine_s = time.perf_counter() - start
    start = time.perf_counter()
    reference = list(probe_replies(model, ids, tok.decode, task, context, trials, seed, ANSWER_TOKENS, haystack=haystack))
    reference_s = time.perf_counter() - start
    right = [(s.is_correct(a), s.is_correct(b)) for (s, a), (_, b) in zip(engine, reference)]
    return {"machine": machine_line(), "model": folder.name, "task": task, "haystack": haystack, "context_tokens": context, "trials": trials,
            "seed": seed, "engine_correct": sum(e for e, _ in right), "transformers_correct": sum(t for _, t in right),
            "disagreements": sum(e != t for e, t in right), "replies_differ": sum(not b.startswith(a) for (_, a), (_, b) in zip(engine, reference)),
            "engine_seconds": round(engine_s, 1), "transformers_seconds": round(reference_s, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="kvtier-tiny-hybrid", help="a shipped model's name or a checkpoint folder")
    p.add_argument("--task", choices=TASKS, default="passkey")
    p.add_argument("--haystack", choices=HAYSTACKS, default="noise")
    p.add_argument("--context", type=int, default=HELD_OUT_CONTEXT)
    p.add_argument("--trials", type=int, default=100)
    p.add_argument("--seed", type=int, default=1234, help="the card's seed (kvtier.training.evaluation.evaluate)")
    p.add_argument("--json-out", type=Path, default=None)
    args = p.parse_args(argv)
    result = agreement(Path(resolve_model(args.model)), args.task, args.haystack, args.context, args.trials, args.seed)
    print(json.dumps(result, indent=1))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
