"""``kvtier train-tiny``: train an embedded model, measure it and write its model card, in one command (``--eval-only``:
measure the trained folder again, resuming its ``eval_results.json``, and rewrite the card)."""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
from pathlib import Path

import numpy as np
import torch

from kvtier.errors import InvalidArgumentError
from kvtier.machine import machine_line
from kvtier.models.embedded import EMBEDDED_DIR
from kvtier.training.evaluation import evaluate
from kvtier.training.model_card import write_card
from kvtier.training.recipes import RECIPES
from kvtier.training.trainer import prepare_tokenizer, train

DESCRIPTIONS = {
    "kvtier-tiny": "A tiny Llama trained by kvtier on 2 CPU cores, so that the engine has a real model to run where no "
                   "model can be downloaded, and so that KV-cache methods can be measured on a model that uses its context.",
    "kvtier-tiny-hybrid": "A tiny attention + Mamba2 hybrid (Bamba) trained by kvtier on 2 CPU cores with kvtier-tiny's tokenizer and "
                          "data: the model whose non-rollbackable SSM state the Marconi prefix cache manages.",
}


def add_train_tiny_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", default="kvtier-tiny", help=f"one of {', '.join(RECIPES)}")
    p.add_argument("--out", default=None, help="output folder (default: the shipped model's folder in the package)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the recipe's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", default=".cache/train", help="where the tokenizer and token streams are cached")
    p.add_argument("--eval-trials", type=int, default=100, help="retrieval trials per task and context length")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--probe-every", type=int, default=150, help="log passkey accuracy at 512 tokens every N steps (0: never); weights do not depend on it")
    p.add_argument("--eval-only", action="store_true", help="do not train: measure the model in --out (resuming its eval_results.json) and rewrite its card")
    p.add_argument("--eval-budget-minutes", type=float, default=None, help="start no evaluation cell after this long; the card shows what was measured")


def run_train_tiny(ns: argparse.Namespace) -> Path:
    if ns.recipe not in RECIPES:
        raise InvalidArgumentError("recipe", f"must be one of {', '.join(RECIPES)}, got {ns.recipe!r}")
    if ns.steps is not None and ns.steps < 1:
        raise InvalidArgumentError("steps", f"must be >= 1, got {ns.steps}")
    if ns.eval_trials < 1:
        raise InvalidArgumentError("eval_trials", f"must be >= 1, got {ns.eval_trials}")
    if ns.eval_budget_minutes is not None and not ns.eval_budget_minutes >= 0:
        raise InvalidArgumentError("eval_budget_minutes", f"must be >= 0, got {ns.eval_budget_minutes}")
    if ns.threads:
        torch.set_num_threads(ns.threads)
    recipe = RECIPES[ns.recipe]
    out = Path(ns.out) if ns.out else EMBEDDED_DIR / recipe.name
    work = Path(ns.work_dir)
    if ns.eval_only:
        summary = json.loads((out / "training_log.json").read_text())
    else:
        summary = train(recipe, out, work, seed=ns.seed, steps=ns.steps, probe_every=ns.probe_every)
    _, _, validation = prepare_tokenizer(work, ns.seed)
    budget = None if ns.eval_budget_minutes is None else 60 * ns.eval_budget_minutes
    results = evaluate(out, np.asarray(validation), ns.eval_trials, budget_s=budget)
    args = _without(sys.argv[2:], "--eval-only", "--eval-budget-minutes") if sys.argv[1:2] == ["train-tiny"] else ["--recipe", recipe.name]
    command = "kvtier train-tiny " + " ".join(shlex.quote(a) for a in args)
    write_card(out, recipe.name, DESCRIPTIONS[recipe.name], results, summary, f"{machine_line()}; Python {platform.python_version()}", command,
               command + " --eval-only")
    return out


def _without(argv: list[str], flag: str, option: str) -> list[str]:
    """``argv`` without ``flag`` and without ``option`` and its value: the command that trains and evaluates everything."""
    out, skip = [], False
    for a in argv:
        if skip or a == flag or a.startswith(option + "="):
            skip = False
            continue
        if a == option:
            skip = True
            continue
        out.append(a)
    return out
