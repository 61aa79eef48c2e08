"""``kvtier eval``: how much a KV method costs in accuracy, measured through the serving engine beside the full cache.

The grid is method x budget x task x context length, each cell ``trials`` retrieval samples (depths spread over
[0, 1], seeded) answered by kvtier's engine, the question fed through decode steps after compression (query-agnostic)
or prefilled with the haystack before it (query-aware), as kvpress has them (:mod:`kvtier.eval.probe`). The full
cache is always measured in the same run, and a cell where it scores below 50% is marked: a method cannot be judged
where the model itself fails.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from tqdm import tqdm

from kvtier.entrypoints.llm import LLM
from kvtier.errors import InvalidArgumentError
from kvtier.eval.agreement import agreement, continue_greedily, text_windows
from kvtier.eval.haystacks import HAYSTACKS
from kvtier.eval.probe import PROTOCOLS, run_engine_probe
from kvtier.eval.retrieval import TASKS
from kvtier.kv_methods.registry import NONE, build_method, parse_config
from kvtier.machine import machine_line

FULL = "full cache"
JUDGEABLE = 0.5  # below this the full cache itself fails the cell
MIN_CONTEXT = 64
AGREEMENT = "agreement"  # not a retrieval task: top-1 agreement and KL with the full cache along its greedy continuation
AGREEMENT_TOKENS = 32


@dataclass(frozen=True)
class EvalCell:
    method: str  # "full cache", or "<method> @ <budget>"
    task: str
    context_tokens: int
    trials: int
    accuracy: float  # for "agreement": the top-1 agreement with the full cache
    by_depth: dict[float, float]
    kl: float | None = None  # "agreement" only: mean KL(full || method), nats


def check_eval_args(kv_method: str, kv_method_config: dict | str | None, budgets: Sequence[float | int], tasks: Sequence[str],
                    contexts: Sequence[int], trials: int, haystack: str, protocol: str = "query-agnostic") -> list[dict | None]:
    """Every run's method config (None: the full cache), checked before anything is loaded; a bad value names its flag."""
    for t in tasks:
        if t not in (*TASKS, AGREEMENT):
            raise InvalidArgumentError("task", f"must be among {', '.join((*TASKS, AGREEMENT))}; got {t!r}")
    if not tasks or not contexts:
        raise InvalidArgumentError("task" if not tasks else "context", "give at least one")
    for c in contexts:
        if isinstance(c, bool) or not isinstance(c, int) or c < MIN_CONTEXT:
            raise InvalidArgumentError("context", f"must be whole numbers of tokens >= {MIN_CONTEXT}, got {c!r}")
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise InvalidArgumentError("trials", f"must be an integer >= 1, got {trials!r}")
    if protocol not in PROTOCOLS:
        raise InvalidArgumentError("protocol", f"must be one of {', '.join(PROTOCOLS)}; got {protocol!r}")
    if haystack not in HAYSTACKS:
        raise InvalidArgumentError("haystack", f"must be one of {', '.join(HAYSTACKS)}; got {haystack!r}")
    config = parse_config(kv_method_config)
    if kv_method == NONE:
        if budgets:
            raise InvalidArgumentError("budget", "needs a --kv-method other than none")
        return [None]
    runs: list[dict | None] = [None]
    for b in budgets or [config.get("budget", 1.0)]:
        run = {**config, "budget": b}
        try:
            build_method(kv_method, run)
        except InvalidArgumentError as e:
            raise InvalidArgumentError("budget" if e.field == "kv_method_config.budget" else e.field, e.message) from None
        runs.append(run)
    return runs


def run_eval(model: str, kv_method: str = NONE, kv_method_config: dict | str | None = None, budgets: Sequence[float | int] = (),
             tasks: Sequence[str] = ("passkey",), contexts: Sequence[int] = (2048,), trials: int = 20, sample_seed: int = 0,
             haystack: str = "noise", protocol: str = "query-agnostic", **engine_kwargs) -> dict:
    """The grid as a JSON-able dict: each run (the full cache, then the method at each budget) loads the engine once.
    ``protocol``: the question after compression (``query-agnostic``) or inside the compressed prompt (``query-aware``)."""
    runs = check_eval_args(kv_method, kv_method_config, budgets, tasks, contexts, trials, haystack, protocol)
    cells: list[EvalCell] = []
    reference: dict[int, list] = {}  # context -> the full cache's greedy continuations (the full cache runs first)
    bar = tqdm(total=len(runs) * len(tasks) * len(contexts), desc="kvtier eval", unit="cell")
    for run in runs:
        name = FULL if run is None else f"{kv_method} @ {run['budget']}"
        llm = LLM(model, kv_method=NONE if run is None else kv_method, kv_method_config=run, **engine_kwargs)
        room = llm.engine.max_model_len - MIN_CONTEXT  # the question and the answer come after the context
        if max(contexts) > room:
            raise InvalidArgumentError("context", f"must be <= {room} for this model (max_model_len {llm.engine.max_model_len} less room for "
                                       f"the question and answer), got {max(contexts)}")
        for task in tasks:
            for context in contexts:
                if task == AGREEMENT:
                    cell = _agreement_cell(llm, name, context, trials, sample_seed, reference)
                else:
                    r = run_engine_probe(llm, llm.get_tokenizer(), task, context, trials, sample_seed, protocol=protocol, haystack=haystack)
                    cell = EvalCell(name, task, context, r.trials, r.accuracy, r.by_depth)
                cells.append(cell)
                bar.set_postfix_str(f"{name} {task} {context}: {cell.accuracy:.0%}")
                bar.update()
        del llm
        gc.collect()
    bar.close()
    return {"machine": machine_line(), "model": model, "kv_method": kv_method, "kv_method_config": parse_config(kv_method_config),
            "haystack": haystack, "trials": trials, "sample_seed": sample_seed, "protocol": protocol,
            "cells": [asdict(c) for c in cells]}


def _agreement_cell(llm: LLM, name: str, context: int, trials: int, seed: int, reference: dict[int, list]) -> EvalCell:
    prompts = text_windows(llm, context, trials, seed)
    if name == FULL:
        reference[context] = continue_greedily(llm, prompts, AGREEMENT_TOKENS)
        return EvalCell(name, AGREEMENT, context, trials, 1.0, {}, 0.0)
    got = continue_greedily(llm, prompts, AGREEMENT_TOKENS, forced=[tokens for tokens, _ in reference[context]])
    a = agreement(reference[context], got)
    return EvalCell(name, AGREEMENT, context, trials, a["top1"], {}, a["kl"])


def markdown_table(result: dict) -> str:
    """Rows task x context, a column per run, the full cache first; ``*`` marks rows where the full cache scores below 50%."""
    cells = result["cells"]
    methods = list(dict.fromkeys(c["method"] for c in cells))
    rows = list(dict.fromkeys((c["task"], c["context_tokens"]) for c in cells))
    acc = {(c["method"], c["task"], c["context_tokens"]): c["accuracy"] for c in cells}
    shown = {k: f"{v:.0%}" for k, v in acc.items()}
    shown.update({(c["method"], c["task"], c["context_tokens"]): f"{c['accuracy']:.0%}, KL {c['kl']:.3f}" for c in cells if c.get("kl") is not None})
    head = (f"{result['model']}, {result['haystack']} haystack, {result['protocol']}, {result['trials']} trials a cell, "
            f"sample seed {result['sample_seed']}")
    lines = [f"{head}; {result['machine']}", "", "| task | context | " + " | ".join(methods) + " |", "| --- | --- |" + " --- |" * len(methods)]
    for task, context in rows:
        mark = " *" if acc[(FULL, task, context)] < JUDGEABLE else ""
        lines.append(f"| {task}{mark} | {context} | " + " | ".join(shown[(m, task, context)] for m in methods) + " |")
    if any(acc[(FULL, t, c)] < JUDGEABLE for t, c in rows):
        lines += ["", "\\* the full cache scores below 50% here: no method can be judged on this row"]
    if any(c.get("kl") is not None for c in cells):
        lines += ["", f"agreement: top-1 agreement with the full cache's greedy continuation ({AGREEMENT_TOKENS} tokens after held-out "
                  "text) and the mean KL(full || method) of the next-token distributions, in nats"]
    return "\n".join(lines)
