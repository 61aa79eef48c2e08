"""Measure a trained embedded model: every figure of its card, cell by cell, kept as each finishes.

Retrieval is a grid of cells (backend x task x haystack kind x context length, plus the held-out key
phrases at 2K), each ``trials`` samples with depths spread over [0, 1]. kvtier's engine answers first
(the acceptance figures), transformers second (the reference); both prefill the haystack and feed the
question through decode steps. ``eval_results.json`` is rewritten after every cell, and a run that
finds it (same trials and seed) measures only the cells it lacks: the grid takes hours on 2 cores.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer as HFTokenizer
from tqdm import tqdm

from kvtier.eval.haystacks import HAYSTACKS, source_texts
from kvtier.eval.perplexity import perplexity
from kvtier.eval.probe import ProbeResult, run_engine_probe, run_probe
from kvtier.eval.retrieval import PHRASINGS, TASKS, phrasing_names
from kvtier.models.registry import MODEL_REGISTRY
from kvtier.training.data import TokenIds, token_stream

CONTEXTS = (512, 1024, 2048, 4080)  # 4080 + the question's answer stays within max_position_embeddings (4096)
HELD_OUT_CONTEXT = 2048
ANSWER_TOKENS = 12
BACKENDS = ("engine", "transformers")
FIB_PROMPT = "def fibonacci(n):"
RESULTS_FILE = "eval_results.json"


@dataclass(frozen=True)
class Cell:
    """One retrieval measurement; ``phrasing`` "" is the task's default wording."""

    backend: str
    task: str
    haystack: str
    context_tokens: int
    phrasing: str = ""


def held_out_context(contexts: tuple[int, ...]) -> int:
    """The length the held-out phrasings are measured at: 2K, or the longest length when 2K is not among them."""
    return HELD_OUT_CONTEXT if HELD_OUT_CONTEXT in contexts else max(contexts)


def grid(backends: tuple[str, ...], contexts: tuple[int, ...] = CONTEXTS) -> list[Cell]:
    """Every cell, in the order they are measured: per backend, passkey and multi-key needle at 2K first (what the
    acceptance reads), then (first backend only) the held-out phrasings, then variable tracking at 2K, then the other
    lengths, shortest first."""
    first = held_out_context(contexts)
    cells = []
    for backend in backends:
        main = [Cell(backend, t, h, n) for n in sorted(contexts, key=lambda n: (n != first, n)) for t in TASKS for h in HAYSTACKS]
        held = [Cell(backend, t, h, first, name) for t in PHRASINGS for name in phrasing_names(t, held_out=True) for h in HAYSTACKS]
        lead = [c for c in main if c.context_tokens == first and c.task in PHRASINGS]
        cells += lead + (held if backend == backends[0] else []) + [c for c in main if c not in lead]
    return cells


def load(folder: Path) -> tuple[torch.nn.Module, HFTokenizer]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return model.eval(), HFTokenizer.from_file(str(folder / "tokenizer.json"))


def backends_for(folder: Path) -> tuple[str, ...]:
    """The engine where it runs the architecture (the figures the card leads with), and transformers always."""
    config = json.loads((folder / "config.json").read_text())
    return BACKENDS if config["architectures"][0] in MODEL_REGISTRY else ("transformers",)


def evaluate(folder: Path, validation: np.ndarray, trials: int, contexts: tuple[int, ...] = CONTEXTS, seed: int = 1234,
             ppl_tokens: int = 131072, budget_s: float | None = None) -> dict:
    """Every figure of the card, as a JSON-able dict, also in ``folder/eval_results.json`` (resumed when it matches).

    With ``budget_s``, no cell starts after that many seconds of this call: the card then shows what is measured
    and a later call goes on from there.
    """
    path = folder / RESULTS_FILE
    old = json.loads(path.read_text()) if path.is_file() else {}
    fresh = {"trials": trials, "seed": seed, "held_out_context": held_out_context(contexts), "contexts": sorted(contexts),
             "backends": list(backends_for(folder)), "cells": []}
    results = old if all(old.get(k) == v for k, v in fresh.items() if k != "cells") else fresh
    model, tok = load(folder)
    ids = TokenIds(tok)
    start = time.perf_counter() - results.get("eval_seconds", 0.0)

    def save() -> None:
        results["eval_seconds"] = time.perf_counter() - start
        path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")

    if "fibonacci" not in results:  # the quick figures first: a model that cannot generate fails in seconds, not after the probes
        fib = ids.encode(FIB_PROMPT)
        with torch.inference_mode():
            out = model.generate(torch.tensor([fib]), max_new_tokens=64, do_sample=False)
        results["fibonacci"] = FIB_PROMPT + tok.decode(out[0, len(fib):].tolist())
        window = model.config.max_position_embeddings // 2
        results["perplexity_window"], results["perplexity_tokens"] = window, ppl_tokens
        results["perplexity"] = {
            "code": perplexity(model, validation, window, ppl_tokens),
            "prose": perplexity(model, token_stream(tok, source_texts("prose", "validation")), window, ppl_tokens),
            "heldout": perplexity(model, token_stream(tok, source_texts("heldout", "validation")), window, ppl_tokens),
        }
        save()
    done = {Cell(**{k: c[k] for k in ("backend", "task", "haystack", "context_tokens", "phrasing")}) for c in results["cells"]}
    todo = [c for c in grid(tuple(results["backends"]), contexts) if c not in done]
    llm = None
    began = time.perf_counter()
    bar = tqdm(todo, desc=f"evaluate {folder.name}", unit="cell")
    for cell in bar:
        if budget_s is not None and time.perf_counter() - began >= budget_s:
            bar.write(f"stopped at the {budget_s:.0f} s budget with {len(todo) - bar.n} cells left")
            break
        wording = {"phrasing": cell.phrasing} if cell.phrasing else {}
        if cell.backend == "engine":
            if llm is None:
                from kvtier.entrypoints.llm import LLM

                llm = LLM(str(folder), dtype="float32")
            r: ProbeResult = run_engine_probe(llm, ids, cell.task, cell.context_tokens, trials, seed, ANSWER_TOKENS, haystack=cell.haystack, **wording)
        else:
            r = run_probe(model, ids, tok.decode, cell.task, cell.context_tokens, trials, seed, ANSWER_TOKENS, haystack=cell.haystack, **wording)
        results["cells"].append({**asdict(cell), "trials": r.trials, "accuracy": r.accuracy, "by_depth": r.by_depth})
        bar.write(f"{cell.backend} {cell.task} {cell.phrasing or 'default'} {cell.haystack} {cell.context_tokens}: {r.accuracy:.0%}")
        save()
    return results
