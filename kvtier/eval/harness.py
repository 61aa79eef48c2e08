"""``kvtier eval``: how much a KV method costs in accuracy, measured through the serving engine beside the full cache.

The grid is method x budget x task x context length, each cell ``trials`` samples answered by kvtier's engine, the
question fed through decode steps after compression (query-agnostic) or prefilled with the context before it
(query-aware), as kvpress has them (:mod:`kvtier.eval.probe`). The tasks: retrieval (needles at depths spread over
[0, 1], seeded), RULER's common-words extraction (:mod:`kvtier.eval.common_words`), agreement with the full cache
along its greedy continuation of held-out text (:mod:`kvtier.eval.agreement`), and perplexity of held-out text read
through the cache (:func:`kvtier.eval.perplexity.cache_perplexity`). The full cache is always measured in the same
run, and a row where it scores below 50% is marked: a method cannot be judged where the model itself fails.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

from tqdm import tqdm

from kvtier.entrypoints.llm import LLM
from kvtier.errors import InvalidArgumentError
from kvtier.eval.agreement import agreement, continue_greedily, text_windows
from kvtier.eval.common_words import ANSWER_TOKENS, COMMONWORDS
from kvtier.eval.haystacks import HAYSTACKS
from kvtier.eval.perplexity import PERPLEXITY, PERPLEXITY_TOKENS, cache_perplexity
from kvtier.eval.probe import PROTOCOLS, run_engine_probe
from kvtier.eval.retrieval import PHRASINGS, TASKS
from kvtier.kv_methods.registry import NONE, build_method, parse_config
from kvtier.machine import machine_line

FULL = "full cache"
JUDGEABLE = 0.5  # below this the full cache itself fails the cell
MIN_CONTEXT = 64
AGREEMENT = "agreement"  # not a retrieval task: top-1 agreement and KL with the full cache along its greedy continuation
AGREEMENT_TOKENS = 32
EVAL_TASKS = (*TASKS, COMMONWORDS, AGREEMENT, PERPLEXITY)  # TASKS are also the model card's grid; the rest are eval-only
PHRASING_NAMES = tuple(sorted(set(PHRASINGS["passkey"]) & set(PHRASINGS["multikey"])))  # the wordings both needle tasks have


@dataclass(frozen=True)
class EvalCell:
    method: str  # "full cache", or "<method> @ <budget>"
    task: str
    context_tokens: int
    trials: int
    accuracy: float  # the mean score; "agreement": top-1 agreement with the full cache; "perplexity": how often the true token is top-1
    by_depth: dict[float, float]  # retrieval tasks only
    kl: float | None = None  # "agreement" only: mean KL(full || method), nats
    perplexity: float | None = None  # "perplexity" only: exp(mean NLL) of the true tokens after the context
    scores: tuple[float, ...] = ()  # retrieval and common words: each sample's score, in sample order
    lost: int | None = None  # a method's retrieval cells: samples the full cache answered right and this run did not


def check_eval_args(kv_method: str | Sequence[str], kv_method_config: dict | str | None, budgets: Sequence[float | int], tasks: Sequence[str],
                    contexts: Sequence[int], trials: int, haystack: str, protocol: str = "query-agnostic",
                    phrasing: str | None = None, variants: Sequence[dict] = ()) -> list[tuple[str, dict] | None]:
    """Every run's method and config (None: the full cache, always first), checked before anything is loaded; a bad value
    names its flag. Several methods share the budgets and the config; each of ``variants`` (ablations: keys laid over
    the config) adds a run per method and budget."""
    for t in tasks:
        if t not in EVAL_TASKS:
            raise InvalidArgumentError("task", f"must be among {', '.join(EVAL_TASKS)}; got {t!r}")
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
    if phrasing is not None and phrasing not in PHRASING_NAMES:
        raise InvalidArgumentError("phrasing", f"must be one of {', '.join(PHRASING_NAMES)}; got {phrasing!r}")
    config = parse_config(kv_method_config)
    methods = [m for m in ([kv_method] if isinstance(kv_method, str) else kv_method) if m != NONE]
    if not methods:
        if budgets:
            raise InvalidArgumentError("budget", "needs a --kv-method other than none")
        return [None]
    runs: list[tuple[str, dict] | None] = [None]
    for method in methods:
        for b in budgets or [config.get("budget", 1.0)]:
            for variant in [parse_variant(v) for v in variants] or [{}]:
                run = {**config, **variant, "budget": b}
                try:
                    build_method(method, run)
                except InvalidArgumentError as e:
                    raise InvalidArgumentError("budget" if e.field == "kv_method_config.budget" else e.field, e.message) from None
                runs.append((method, run))
    return runs


def parse_variant(variant: dict | str) -> dict:
    """An ablation's config keys, from a dict or the CLI's JSON object; the budget is the grid's, not a variant's."""
    try:
        parsed = json.loads(variant) if isinstance(variant, str) else variant
    except json.JSONDecodeError as e:
        raise InvalidArgumentError("variant", f"must be a JSON object, got {variant!r} ({e.msg})") from None
    if not isinstance(parsed, dict) or "budget" in parsed:
        raise InvalidArgumentError("variant", f"must be a JSON object of config keys other than budget (--budget sets it; {{}} runs the "
                                   f"config as it is), got {variant!r}")
    return parsed


def run_name(method: str, config: dict, base: dict) -> str:
    """A run's column: the method, the keys it sets beyond the shared config (an ablation's), and its budget last, so
    that plots draw one line per method and ablation."""
    extra = ", ".join(f"{k}={json.dumps(v)}" for k, v in config.items() if k != "budget" and base.get(k, None) != v)
    return f"{method} ({extra}) @ {config['budget']}" if extra else f"{method} @ {config['budget']}"


def run_eval(model: str, kv_method: str | Sequence[str] = NONE, kv_method_config: dict | str | None = None, budgets: Sequence[float | int] = (),
             tasks: Sequence[str] = ("passkey",), contexts: Sequence[int] = (2048,), trials: int = 20, sample_seed: int = 0,
             haystack: str = "noise", protocol: str = "query-agnostic", phrasing: str | None = None, variants: Sequence[dict] = (),
             **engine_kwargs) -> dict:
    """The grid as a JSON-able dict: each run (the full cache, then each method at each budget) loads the engine once.
    ``protocol``: the question after compression (``query-agnostic``) or inside the compressed prompt (``query-aware``).
    ``phrasing``: how passkey and multi-key needles are worded (``kvtier.eval.retrieval.PHRASINGS``; the held-out ones,
    ``access-code`` and ``secret-number``, were in no training document); None: each task's default. ``variants``:
    ablations, each a dict of config keys run beside the shared config and named in its column."""
    runs = check_eval_args(kv_method, kv_method_config, budgets, tasks, contexts, trials, haystack, protocol, phrasing, variants)
    base = parse_config(kv_method_config)
    cells: list[EvalCell] = []
    reference: dict[int, list] = {}  # context -> the full cache's greedy continuations (the full cache runs first)
    bar = tqdm(total=len(runs) * len(tasks) * len(contexts), desc="kvtier eval", unit="cell")
    for run in runs:
        method, config = run or (NONE, None)
        name = FULL if run is None else run_name(method, config, base)
        llm = LLM(model, kv_method=method, kv_method_config=config, **engine_kwargs)
        room = llm.engine.max_model_len - MIN_CONTEXT  # the answer (or perplexity's scored tokens) comes after the context
        if max(contexts) > room:
            raise InvalidArgumentError("context", f"must be <= {room} for this model (max_model_len {llm.engine.max_model_len} less room for "
                                       f"the question and answer), got {max(contexts)}")
        for task in tasks:
            for context in contexts:
                if task == AGREEMENT:
                    cell = _agreement_cell(llm, name, context, trials, sample_seed, reference)
                elif task == PERPLEXITY:
                    ppl, top1 = cache_perplexity(llm, context, trials, sample_seed)
                    cell = EvalCell(name, task, context, trials, top1, {}, perplexity=ppl)
                else:  # common words has no haystack (its list is the context) and a ten-word answer
                    kw = {"haystack": haystack} if task in TASKS else {"max_new_tokens": ANSWER_TOKENS}
                    if phrasing is not None and task in PHRASINGS:
                        kw["phrasing"] = phrasing
                    r = run_engine_probe(llm, llm.get_tokenizer(), task, context, trials, sample_seed, protocol=protocol, **kw)
                    cell = EvalCell(name, task, context, r.trials, r.accuracy, r.by_depth, scores=r.scores)
                    if name != FULL:
                        full = next(c for c in cells if c.method == FULL and c.task == task and c.context_tokens == context)
                        cell = replace(cell, lost=sum(f == 1 and m < 1 for f, m in zip(full.scores, cell.scores)))
                cells.append(cell)
                bar.set_postfix_str(f"{name} {task} {context}: {_shown(asdict(cell))}")
                bar.update()
        del llm
        gc.collect()
    bar.close()
    return {"machine": machine_line(), "model": model, "kv_method": kv_method, "kv_method_config": base, "variants": [parse_variant(v) for v in variants],
            "haystack": haystack, "phrasing": phrasing, "trials": trials, "sample_seed": sample_seed, "protocol": protocol,
            "cells": [asdict(c) for c in cells]}


def _agreement_cell(llm: LLM, name: str, context: int, trials: int, seed: int, reference: dict[int, list]) -> EvalCell:
    prompts = text_windows(llm, context, trials, seed)
    if name == FULL:
        reference[context] = continue_greedily(llm, prompts, AGREEMENT_TOKENS)
        return EvalCell(name, AGREEMENT, context, trials, 1.0, {}, 0.0)
    got = continue_greedily(llm, prompts, AGREEMENT_TOKENS, forced=[tokens for tokens, _ in reference[context]])
    a = agreement(reference[context], got)
    return EvalCell(name, AGREEMENT, context, trials, a["top1"], {}, a["kl"])


def _shown(cell: dict) -> str:
    """A cell as the table shows it: its perplexity, or its score (and KL, for agreement)."""
    if cell.get("perplexity") is not None:
        return f"ppl {cell['perplexity']:.1f}"
    lost = f" (-{cell['lost']})" if cell.get("lost") else ""
    return f"{cell['accuracy']:.0%}" + (f", KL {cell['kl']:.3f}" if cell.get("kl") is not None else "") + lost


def markdown_table(result: dict) -> str:
    """Rows task x context, a column per run, the full cache first; ``*`` marks rows where the full cache scores below 50%
    (perplexity is no score: its rows are never marked)."""
    cells = {(c["method"], c["task"], c["context_tokens"]): c for c in result["cells"]}
    methods = list(dict.fromkeys(m for m, _, _ in cells))
    rows = list(dict.fromkeys((t, n) for _, t, n in cells))
    failed = {row for row in rows if cells[(FULL, *row)].get("perplexity") is None and cells[(FULL, *row)]["accuracy"] < JUDGEABLE}
    wording = f", needles worded {result['phrasing']!r}" if result.get("phrasing") else ""
    head = (f"{result['model']}, {result['haystack']} haystack{wording}, {result['protocol']}, {result['trials']} trials a cell, "
            f"sample seed {result['sample_seed']}")
    lines = [f"{head}; {result['machine']}", "", "| task | context | " + " | ".join(methods) + " |", "| --- | --- |" + " --- |" * len(methods)]
    for task, context in rows:
        mark = " *" if (task, context) in failed else ""
        lines.append(f"| {task}{mark} | {context} | " + " | ".join(_shown(cells[(m, task, context)]) for m in methods) + " |")
    if failed:
        lines += ["", "\\* the full cache scores below 50% here: no method can be judged on this row"]
    if any(c.get("lost") for c in cells.values()):
        lines += ["", "(-n): n samples the full cache answered right and this run did not"]
    if any(c.get("kl") is not None for c in cells.values()):
        lines += ["", f"agreement: top-1 agreement with the full cache's greedy continuation ({AGREEMENT_TOKENS} tokens after held-out "
                  "text) and the mean KL(full || method) of the next-token distributions, in nats"]
    if any(c.get("perplexity") is not None for c in cells.values()):
        lines += ["", f"perplexity: exp(mean NLL) of the {PERPLEXITY_TOKENS} tokens of held-out text after each window, forced through "
                  "decode steps after the (compressed) window; lower is better"]
    return "\n".join(lines)
