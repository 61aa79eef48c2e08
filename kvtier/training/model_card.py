"""Write an embedded model's card (``README.md`` in its folder) from its training log and ``eval_results.json``.

Every figure comes from :func:`kvtier.training.evaluation.evaluate`, run on the saved bf16 weights:
perplexity on held-out code, prose and never-seen text, retrieval by task x haystack kind x length x
depth through kvtier's engine and transformers, and a greedy continuation of ``def fibonacci(n):``,
checked as Python syntax.
"""

from __future__ import annotations

import codeop
import json
import warnings
from pathlib import Path

import numpy as np

from kvtier.eval.haystacks import HAYSTACKS, HELDOUT_FILES
from kvtier.eval.retrieval import PHRASINGS, TASKS, phrasing_names
from kvtier.training.data import COPY_SEGMENT, MULTIKEY_DISTRACTORS


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


def _by_cell(results: dict) -> dict[tuple, dict]:
    return {(c["backend"], c["task"], c["haystack"], c["context_tokens"], c["phrasing"]): c for c in results["cells"]}


def _pct(cell: dict | None) -> str:
    return "-" if cell is None else f"{100 * cell['accuracy']:.0f}%"


def retrieval_tables(results: dict) -> str:
    """Per task, a row per haystack kind and a column per length: the first backend's figure in bold, the second's after it."""
    cells = _by_cell(results)
    backends, contexts = results["backends"], results["contexts"]

    def entry(task: str, h: str, n: int) -> str:
        figures = [_pct(cells.get((b, task, h, n, ""))) for b in backends]
        return " / ".join([f"**{figures[0]}**", *figures[1:]] if len(figures) > 1 else figures)

    tables = []
    for task in TASKS:
        lines = [f"| {task} | " + " | ".join(f"{n} tokens" for n in contexts) + " |", "| --- |" + " --- |" * len(contexts)]
        lines += [f"| {h} | " + " | ".join(entry(task, h, n) for n in contexts) + " |" for h in HAYSTACKS]
        tables.append("\n".join(lines))
    return "\n\n".join(tables)


def phrasing_table(results: dict) -> str:
    """The held-out key phrases (at 2K): a row per task and phrasing, a column per haystack kind, the first backend's figures."""
    cells = _by_cell(results)
    backend = results["backends"][0]
    rows = [(t, name) for t in PHRASINGS for name in phrasing_names(t, held_out=True)]
    lines = ["| task | phrasing | " + " | ".join(HAYSTACKS) + " |", "| --- | --- |" + " --- |" * len(HAYSTACKS)]
    for task, name in rows:
        lines.append(f"| {task} | {name} | " + " | ".join(_pct(cells.get((backend, task, h, results['held_out_context'], name))) for h in HAYSTACKS) + " |")
    return "\n".join(lines)


def depth_table(results: dict, task: str) -> str:
    """Accuracy by depth (at 2K), a row per haystack kind (the first backend's figures)."""
    cells = _by_cell(results)
    backend = results["backends"][0]
    rows = [(h, cells[key]) for h in HAYSTACKS if (key := (backend, task, h, results["held_out_context"], "")) in cells]
    if not rows:
        return "(not measured yet)"
    depths = list(rows[0][1]["by_depth"])
    lines = ["| haystack | " + " | ".join(f"{float(d):.2f}" for d in depths) + " |", "| --- |" + " --- |" * len(depths)]
    lines += [f"| {h} | " + " | ".join(f"{100 * c['by_depth'][d]:.0f}%" for d in depths) + " |" for h, c in rows]
    return "\n".join(lines)


def _stages(training: dict) -> str:
    return ", then ".join(f"{100 * s['fraction']:.0f}% of them with {s['batch_size']} x {s['seq_len']}-token rows" for s in training["stages"])


def _stage_mixes(training: dict) -> str:
    """A bullet per stage: the mix it draws its rows from (its own, or the recipe's)."""
    return "".join(f"""
- the {s['seq_len']}-token stage: {100 * m['retrieval_fraction']:.0f}% retrieval rows (passkey {100 * m['passkey']:.0f}%,
  multi-key {100 * m['multikey']:.0f}%, variable tracking {100 * m['vartrack']:.0f}% of documents, with {_hops(m)}), documents from
  {m['min_tokens']} tokens, {100 * m['copy_fraction']:.0f}% copy rows{_followups(m)}; needles hidden in {_haystacks(m)}{_wording(m)};"""
                   for s in training["stages"] if (m := s.get("mix") or training["mix"]))


def _hops(mix: dict) -> str:
    low, high = mix.get("vartrack_hops", (1, 4))
    return f"{low} link a chain" if low == high == 1 else f"{low}-{high} links a chain"


def _haystacks(mix: dict) -> str:
    return ", ".join(f"{kind} {100 * weight:.0f}%" for kind, weight in mix.get("haystacks", [("noise", 1.0)]))


def _wording(mix: dict) -> str:
    if not mix.get("vary_phrasing"):
        return ", in each task's default wording"
    names = [f"{task}: {', '.join(_phrasing_name(task, n) for n in phrasing_names(task, held_out=False))}" for task in PHRASINGS]
    return f", worded in every training phrasing ({'; '.join(names)})"


def _phrasing_name(task: str, name: str) -> str:
    return f"{name} (a key phrase of two random words a document)" if "{phrase}" in PHRASINGS[task][name].needle else name


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


def write_card(folder: Path, name: str, description: str, results: dict, training: dict, evaluated_on: str, command: str, eval_command: str) -> Path:
    config = json.loads((folder / "config.json").read_text())
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        params = sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())
    size_mb = sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 1e6
    ppl = results["perplexity"]
    backends = results["backends"]
    shown = ("**kvtier's engine** (`LLM.generate`, greedy, fp32, the question forced through decode by `ForcedTokens`) / "
             "transformers (the same samples, `kvtier.eval.probe`)") if len(backends) > 1 else "transformers (`kvtier.eval.probe`)"
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
| trained on | {training.get('machine', 'not recorded (trained before the log kept it)')} |
| card written on | {evaluated_on} (earlier evaluation cells may come from other runs) |

## Data

The running interpreter's standard-library sources (`*.py`, code, docstrings and comments; `site-packages`
excluded), split by file into train and validation with seed 0. Training rows (every one opens with `<s>`):

- retrieval rows are packed with generated documents from `kvtier.eval.retrieval` (passkey, multi-key needle
  with {MULTIKEY_DISTRACTORS[0]}-{MULTIKEY_DISTRACTORS[1]} distractors, variable tracking; fewer needles where a short document cannot hold them),
  their lengths drawn log-uniformly from the stage's shortest up to the rest of the row, the haystack from the train split;
- copy rows are a segment of {COPY_SEGMENT[0]}-{COPY_SEGMENT[1]} random tokens repeated after stretches of code, which only an induction
  head (find the earlier copy, read on) can predict;{_stage_mixes(training)}
- the rest, and the tails the documents leave, are windows of the tokenized stdlib.

Held out of training and of the tokenizer, for evaluation only: the `heldout` haystack, IDLE's text files
(`idlelib/` {", ".join(HELDOUT_FILES)}: release notes, history, credits; English with issue numbers), and the
key phrases "access code" and "secret number", each asked with a question that restates it.

## Evaluation

Measured on the shipped bf16 weights (run in fp32) by `kvtier.training.evaluation.evaluate`, seed {results['seed']}.

- **Perplexity** in windows of {results['perplexity_window']} tokens, over the first {results['perplexity_tokens']:,} tokens of each:
  held-out stdlib code (validation files) **{ppl['code']:.2f}**; their docstrings and comments (prose) **{ppl['prose']:.2f}**;
  IDLE's text files, never trained on **{ppl['heldout']:.2f}**.
- **Retrieval accuracy**, {results['trials']} trials per cell, depths spread evenly over [0, 1], needles hidden in
  each haystack kind of `kvtier.eval.haystacks` (validation split): `noise` (the Landmark filler), `code`,
  `prose` (docstrings and comments), `mixed` and the held-out `heldout`. The haystack is prefilled, the
  question is fed through decode steps, and the first number generated is compared with the key (variable
  tracking: the set of names generated must equal the chain). Multi-key needle has 4 distractors; variable
  tracking has 4 links. Cells: {shown}; "-" is not measured yet (the run resumes where it stopped).

{retrieval_tables(results)}

The held-out key phrases at {results['held_out_context']} tokens (a phrasing no training document uses; the question restates it):

{phrasing_table(results)}

Passkey accuracy at {results['held_out_context']} tokens by depth (0 = start of the haystack):

{depth_table(results, 'passkey')}

Multi-key needle accuracy at {results['held_out_context']} tokens by depth:

{depth_table(results, 'multikey')}

The training rows are {training['seq_len']} tokens long; the longest column measures length extrapolation past them.

Variable tracking stays out of reach at this size, though training grows its chains from one link to four:
each link names its answer before what identifies it ("VAR B = VAR A"), so to recall B when asked about A's
value a causal model must already have folded the 2-4 token name B into the positions after it. The copy
circuit these models start from (and what retrieval learns on top of it) reads the tokens that follow a
match, which is the passkey and multi-key layout, not this one.

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

trains, evaluates and writes this card; the evaluation alone (resumed from `eval_results.json`):

```bash
{eval_command}
```

The corpus is the standard library of the Python that runs the command, so a different Python
version gives a slightly different corpus and tokenizer; the quality reproduces within noise.
"""
    path = folder / "README.md"
    path.write_text(card, encoding="utf-8")
    return path
