"""Measure a trained embedded model and write its model card (``README.md`` in its folder).

Every figure in a card comes from :func:`evaluate`, run on the saved bf16 weights: validation
perplexity on held-out stdlib files, retrieval accuracy by context length and depth, and a greedy
continuation of ``def fibonacci(n):``, checked as Python syntax.
"""

from __future__ import annotations

import codeop
import json
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer as HFTokenizer
from tqdm import tqdm

from kvtier.eval.perplexity import perplexity
from kvtier.eval.probe import ProbeResult, run_engine_probe, run_probe
from kvtier.models.registry import MODEL_REGISTRY
from kvtier.training.data import COPY_SEGMENT, MULTIKEY_DISTRACTORS, VARTRACK_HOPS, TokenIds

CONTEXTS = (512, 1024, 2048, 4096)
TASKS = ("passkey", "multikey", "vartrack")
FIB_PROMPT = "def fibonacci(n):"


def load(folder: Path) -> tuple[torch.nn.Module, HFTokenizer]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return model.eval(), HFTokenizer.from_file(str(folder / "tokenizer.json"))


def evaluate(folder: Path, validation: np.ndarray, trials: int, contexts: tuple[int, ...] = CONTEXTS, seed: int = 1234,
             ppl_tokens: int = 131072) -> dict:
    """Every figure of the card, as a JSON-able dict (also written to ``eval_results.json``)."""
    model, tok = load(folder)
    ids = TokenIds(tok)
    decode = lambda out: tok.decode(out)  # noqa: E731
    start = time.perf_counter()
    fib = ids.encode(FIB_PROMPT)  # the quick figure first: a model that cannot generate fails in seconds, not after the probes
    with torch.inference_mode():
        out = model.generate(torch.tensor([fib]), max_new_tokens=64, do_sample=False)
    fibonacci = FIB_PROMPT + tok.decode(out[0, len(fib):].tolist())
    window = model.config.max_position_embeddings // 2
    results: dict = {"validation_perplexity": perplexity(model, validation, window, ppl_tokens), "validation_tokens": min(len(validation), ppl_tokens),
                     "perplexity_window": window, "retrieval": []}
    cells = tqdm([(task, n) for task in TASKS for n in contexts], desc=f"evaluate {folder.name}", unit="cell")
    for task, n in cells:
        r: ProbeResult = run_probe(model, ids, decode, task, n, trials, seed)
        results["retrieval"].append({"task": task, "context_tokens": n, "trials": trials, "accuracy": r.accuracy, "by_depth": r.by_depth})
        cells.write(f"{task}@{n}: {r.accuracy:.0%}")
    results["fibonacci"] = fibonacci
    if model.config.architectures[0] in MODEL_REGISTRY:  # the engine runs it: the card shows the engine's answers too
        results["engine_retrieval"] = engine_retrieval(folder, trials, contexts, seed)
    results["eval_seconds"] = time.perf_counter() - start
    (folder / "eval_results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return results


def python_syntax(code: str) -> str:
    """``"complete"`` (a valid program as it stands), ``"incomplete"`` (a valid beginning, cut off) or ``"syntax error: ..."``.

    A generation stops at its token limit, usually mid-statement; ``codeop`` (the interactive
    interpreter's test) tells such a valid prefix from text no continuation can make valid.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SyntaxWarning on odd literals is not a verdict
        try:
            return "incomplete" if codeop.compile_command(code, symbol="exec") is None else "complete"
        except (SyntaxError, ValueError, OverflowError) as e:
            return f"syntax error: {getattr(e, 'msg', e)}"


def _task_table(contexts: list[int], cell: Callable[[str, int], str]) -> str:
    """A markdown table: a row per task, a column per context length, each cell ``cell(task, n)``."""
    lines = ["| task | " + " | ".join(f"{n} tokens" for n in contexts) + " |", "| --- |" + " --- |" * len(contexts)]
    lines += [f"| {task} | " + " | ".join(cell(task, n) for n in contexts) + " |" for task in TASKS]
    return "\n".join(lines)


def _accuracies(cells: list[dict]) -> dict[tuple[str, int], float]:
    return {(r["task"], r["context_tokens"]): r["accuracy"] for r in cells}


def _retrieval_table(results: dict) -> str:
    acc = _accuracies(results["retrieval"])
    return _task_table(sorted({n for _, n in acc}), lambda task, n: f"{100 * acc[task, n]:.0f}%")


ENGINE_ANSWER_TOKENS = 12  # what the transformers probe generates
ENGINE_BEGIN = "<!-- engine-retrieval -->"
ENGINE_END = "<!-- /engine-retrieval -->"


def engine_retrieval(folder: Path, trials: int, contexts: tuple[int, ...] = CONTEXTS, seed: int = 1234) -> list[dict]:
    """The card's retrieval cells answered through kvtier's engine (fp32, as the transformers figures): same samples. A
    context whose prompt and answer do not fit in ``max_position_embeddings`` is left out: kvtier, like vLLM, does not
    run a model past it."""
    from kvtier.entrypoints.llm import LLM

    llm = LLM(str(folder), dtype="float32")
    ids = TokenIds(HFTokenizer.from_file(str(folder / "tokenizer.json")))
    fitting = [n for n in contexts if n + ENGINE_ANSWER_TOKENS <= llm.engine.max_model_len]
    cells = []
    for task, n in tqdm([(task, n) for task in TASKS for n in fitting], desc=f"engine {folder.name}", unit="cell"):
        r = run_engine_probe(llm, ids, task, n, trials, seed, ENGINE_ANSWER_TOKENS)
        cells.append({"task": task, "context_tokens": n, "trials": trials, "accuracy": r.accuracy, "by_depth": r.by_depth})
    return cells


def engine_section(results: dict) -> str:
    """The card's section comparing kvtier's engine with transformers on the same samples; empty before it is measured."""
    cells = results.get("engine_retrieval")
    if not cells:
        return ""
    hf, mine = _accuracies(results["retrieval"]), _accuracies(cells)
    contexts = sorted({n for _, n in hf})
    table = _task_table(contexts, lambda task, n: f"{100 * hf[task, n]:.0f}% / " + (f"**{100 * mine[task, n]:.0f}%**" if (task, n) in mine else "-"))
    skipped = sorted({n for n in contexts if all((t, n) not in mine for t in TASKS)})
    past = (f" The engine does not run past `max_position_embeddings`, as vLLM does not, so the {', '.join(map(str, skipped))}-token "
            f"prompts with their {ENGINE_ANSWER_TOKENS}-token answers (-) are transformers only." if skipped else "")
    return f"""
{ENGINE_BEGIN}
### Through kvtier's engine

The same samples answered by kvtier's engine (`LLM.generate`, greedy, fp32), in **bold**, beside the
transformers figures above: one batch of {cells[0]['trials']} prompts per cell, each prompt (haystack and
question) prefilled in the engine's chunks, then the answer decoded.{past} {results.get('engine_note', '')}

{table}
{ENGINE_END}
"""


def add_engine_retrieval(folder: Path, trials: int, contexts: tuple[int, ...] = CONTEXTS, note: str = "") -> dict:
    """Measure the engine column of an existing card and write it into ``eval_results.json`` and the card."""
    results = json.loads((folder / "eval_results.json").read_text())
    results["engine_retrieval"] = engine_retrieval(folder, trials, contexts)
    results["engine_note"] = note
    (folder / "eval_results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    card = (folder / "README.md").read_text(encoding="utf-8")
    section = engine_section(results)
    if ENGINE_BEGIN in card:
        card = card[: card.index(ENGINE_BEGIN) - 1] + section + card[card.index(ENGINE_END) + len(ENGINE_END) + 1:]
    else:
        at = card.index("## Greedy continuation")
        card = card[:at].rstrip("\n") + "\n" + section + "\n" + card[at:]
    (folder / "README.md").write_text(card, encoding="utf-8")
    return results


def _depth_table(results: dict, task: str) -> str:
    rows = [r for r in results["retrieval"] if r["task"] == task]
    depths = list(rows[0]["by_depth"])
    lines = ["| context | " + " | ".join(f"{float(d):.2f}" for d in depths) + " |", "| --- |" + " --- |" * len(depths)]
    for r in rows:
        lines.append(f"| {r['context_tokens']} | " + " | ".join(f"{100 * r['by_depth'][d]:.0f}%" for d in depths) + " |")
    return "\n".join(lines)


def _stages(training: dict) -> str:
    return ", then ".join(f"{100 * s['fraction']:.0f}% of them with {s['batch_size']} x {s['seq_len']}-token rows" for s in training["stages"])


def _stage_mixes(training: dict) -> str:
    """A bullet for each stage that draws its rows from its own mix, not the recipe's."""
    return "".join(f"""
- the {s['seq_len']}-token stage draws its own mix: {100 * m['retrieval_fraction']:.0f}% retrieval rows (passkey {100 * m['passkey']:.0f}%,
  multi-key {100 * m['multikey']:.0f}%, variable tracking {100 * m['vartrack']:.0f}% of documents), documents from {m['min_tokens']} tokens,
  {100 * m['copy_fraction']:.0f}% copy rows{_followups(m)};""" for s in training["stages"] if (m := s.get("mix")))


def _followups(mix: dict) -> str:
    """The clause for a mix whose multi-key documents go on to ask about their distractors."""
    return " (multi-key documents then ask about every distractor too, as many as the row holds)" if mix.get("followups") else ""


def _attention_layers(config: dict) -> list[int]:
    return config.get("attn_layer_indices", list(range(config["num_hidden_layers"])))


def _layers(config: dict) -> str:
    attn = _attention_layers(config)
    if len(attn) == config["num_hidden_layers"]:
        return f"{config['num_hidden_layers']} attention"
    return (f"{config['num_hidden_layers']}: attention at {', '.join(map(str, attn))}, Mamba2 at the other "
            f"{config['num_hidden_layers'] - len(attn)} ({config['mamba_n_heads']} heads x {config['mamba_d_head']}, state {config['mamba_d_state']}, "
            f"conv {config['mamba_d_conv']})")


def _initialisation(name: str, config: dict) -> str:
    from kvtier.training.recipes import RECIPES

    circuit = RECIPES[name].circuit
    if circuit is None:
        return "transformers' default (normal, std 0.02)"
    from kvtier.training.circuit_init import OFFSETS

    first, second = _attention_layers(config)[:2]
    return (f"structured (`kvtier.training.circuit_init`): layer {first} starts with heads that attend {', '.join(map(str, OFFSETS))} tokens "
            f"back, layer {second} with heads that match the last {circuit.key_tokens} tokens against those features in the "
            f"{circuit.content_pairs} lowest RoPE frequencies and copy what follows; residual outputs start at zero; "
            "everything is then trained")


def write_card(folder: Path, name: str, description: str, results: dict, training: dict, machine: str, command: str) -> Path:
    config = json.loads((folder / "config.json").read_text())
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        params = sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())
    size_mb = sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 1e6
    trials = results["retrieval"][0]["trials"]
    mix = training["mix"]
    card = f"""---
license: apache-2.0
library_name: transformers
pipeline_tag: text-generation
tags: [kvtier, tiny, python-code, long-context-retrieval]
---

# {name}

{description}

| | |
| --- | --- |
| architecture | `{config['architectures'][0]}` |
| parameters | {params / 1e6:.2f} M ({size_mb:.1f} MB of bf16 safetensors) |
| layers | {_layers(config)} |
| hidden / attention heads | {config['hidden_size']} / {config['num_attention_heads']} (KV heads {config['num_key_value_heads']}) |
| context | trained on {training['seq_len']}-token rows; `max_position_embeddings` {config['max_position_embeddings']} |
| tokenizer | byte-level BPE, {config['vocab_size']} tokens, digits split one per token, trained on the training split |
| training | {training['steps']} steps ({_stages(training)}) = {training['tokens'] / 1e6:.1f} M tokens in {training['train_seconds'] / 60:.1f} min |
| initialisation | {_initialisation(name, config)} |
| machine | {machine} |

## Data

The running interpreter's standard-library sources (`*.py`, code, docstrings and comments; `site-packages`
excluded), split by file into train and validation with seed 0. Training rows (every one opens with `<s>`):

- {100 * mix['retrieval_fraction']:.0f}% are packed with generated retrieval documents from `kvtier.eval.retrieval`
  (passkey {100 * mix['passkey']:.0f}%, multi-key needle {100 * mix['multikey']:.0f}% with {MULTIKEY_DISTRACTORS[0]}-{MULTIKEY_DISTRACTORS[1]} distractors, variable tracking {100 * mix['vartrack']:.0f}%
  with {VARTRACK_HOPS[0]}-{VARTRACK_HOPS[1]} hops; fewer needles where a short document cannot hold them), their lengths drawn
  log-uniformly from {mix['min_tokens']} tokens up to the rest of the row{_followups(mix)};
- {100 * mix['copy_fraction']:.0f}% are copy rows: a segment of {COPY_SEGMENT[0]}-{COPY_SEGMENT[1]} random tokens repeated after stretches of
  code, which only an induction head (find the earlier copy, read on) can predict;{_stage_mixes(training)}
- the rest, and the tails the documents leave, are windows of the tokenized stdlib.

## Evaluation

Measured on the shipped bf16 weights (run in fp32) by `kvtier.training.model_card.evaluate`, seed 1234.

- **Validation perplexity**: **{results['validation_perplexity']:.2f}** over {results['validation_tokens']:,} tokens of held-out stdlib
  files, in windows of {results['perplexity_window']} tokens.
- **Retrieval accuracy**, {trials} trials per cell, depths spread evenly over [0, 1]. The haystack is
  prefilled, the question is fed through decode steps, and the first number generated is compared
  with the key (variable tracking: the set of names generated must equal the chain). Multi-key needle
  has 4 distractors; variable tracking has 4 hops.

{_retrieval_table(results)}

Passkey accuracy by depth (0 = start of the haystack):

{_depth_table(results, 'passkey')}

Multi-key needle accuracy by depth:

{_depth_table(results, 'multikey')}

The training rows are {training['seq_len']} tokens long; the 4,096-token column measures length
extrapolation past that, which the model was not trained for.
{engine_section(results)}
## Greedy continuation of `def fibonacci(n):`

```python
{results['fibonacci']}
```

As Python (`codeop`, the interactive interpreter's test of a statement so far; "incomplete" is a valid
beginning that the 64-token limit cut off): **{python_syntax(results['fibonacci'])}**.

## Loss curve

![training loss](loss_curve.png)

## Reproduce

```bash
{command}
```

The corpus is the standard library of the Python that runs the command, so a different Python
version gives a slightly different corpus and tokenizer; the quality reproduces within noise.
"""
    path = folder / "README.md"
    path.write_text(card, encoding="utf-8")
    return path
