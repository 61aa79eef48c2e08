"""The training loop for the embedded models: deterministic, bounded by a step count, saved as HF folders.

transformers builds the model from the recipe's config (it is the reference implementation of these
architectures), so the saved folder is exactly what ``from_pretrained`` and kvtier's loader read.
"""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer as HFTokenizer
from tqdm import tqdm

from kvtier.eval.probe import induction_accuracy, run_probe
from kvtier.machine import machine_line
from kvtier.training.bpe import BOS_ID, EOS_ID, PAD_ID, tokenizer_config, train_bpe
from kvtier.training.circuit_init import seed_circuit
from kvtier.training.corpus import read_texts, split_corpus
from kvtier.training.data import BatchMaker, TokenIds, token_stream
from kvtier.training.recipes import VOCAB_SIZE, Recipe


def prepare_tokenizer(work_dir: Path, seed: int, corpus_root: Path | None = None) -> tuple[HFTokenizer, np.ndarray, np.ndarray]:
    """The BPE trained on the train split, and the train and validation token streams (cached in ``work_dir``).

    ``corpus_root`` replaces the standard library's folder (tests train on a small part of it).
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    tok_path, train_path, val_path = work_dir / "tokenizer.json", work_dir / "train.npy", work_dir / "validation.npy"
    if tok_path.is_file() and train_path.is_file() and val_path.is_file():
        return HFTokenizer.from_file(str(tok_path)), np.load(train_path), np.load(val_path)
    split = split_corpus(seed=seed, root=corpus_root)
    train_texts = read_texts(split.train)
    tok = train_bpe(train_texts, VOCAB_SIZE)
    train, val = token_stream(tok, train_texts), token_stream(tok, read_texts(split.validation))
    tok.save(str(tok_path))
    np.save(train_path, train)
    np.save(val_path, val)
    return tok, train, val


PROBE_HAYSTACKS = ("noise", "heldout")


def lr_at(recipe: Recipe, step: int, steps: int) -> float:
    """Linear warm-up, then cosine decay over ``steps`` to ``min_lr_ratio`` of the peak."""
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, steps - recipe.warmup_steps)
    return recipe.lr * (recipe.min_lr_ratio + (1 - recipe.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def build_model(recipe: Recipe, seed: int) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(**{k: v for k, v in recipe.config.items() if k != "architectures"})
    config.architectures = recipe.config["architectures"]
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)


def train(recipe: Recipe, out_dir: Path, work_dir: Path, seed: int = 0, steps: int | None = None, corpus_root: Path | None = None,
          probe_every: int = 0) -> dict:
    """Train ``recipe`` for ``steps`` (default: the recipe's) and write the HF folder to ``out_dir``.

    With ``probe_every``, every that many steps the induction accuracy and the passkey accuracy at
    512 tokens (10 trials) in the noise and the held-out haystack are logged: retrieval appears abruptly,
    when the copying circuit forms, and generalises (or not) beyond the training text.
    """
    steps = recipe.steps if steps is None else steps
    torch.manual_seed(seed)
    tok, train_ids, _ = prepare_tokenizer(work_dir, seed, corpus_root)
    batches = BatchMaker(tok, train_ids, seed)
    model = build_model(recipe, seed)
    if recipe.circuit:
        seed_circuit(model, recipe.circuit, seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=recipe.lr, betas=(0.9, 0.95), eps=1e-8)
    log: list[dict] = []
    start = time.perf_counter()
    model.train()
    bar = tqdm(range(steps), desc=f"train {recipe.name}", unit="step")
    for step in bar:
        lr = lr_at(recipe, step, steps)
        for g in opt.param_groups:
            g["lr"] = lr
        stage = recipe.stage_at(step, steps)
        x = batches.batch(stage.batch_size, stage.seq_len, recipe.mix_at(step, steps))
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = loss.item()
        log.append({"step": step, "loss": value, "lr": lr, "seconds": time.perf_counter() - start})
        if probe_every and (step + 1) % probe_every == 0:
            model.eval()
            log[-1]["induction"] = induction_accuracy(model, tok.get_vocab_size())
            for kind in PROBE_HAYSTACKS:
                log[-1][f"passkey_512_{kind}"] = run_probe(model, TokenIds(tok), tok.decode, "passkey", 512, 10, seed=10_000 + step, haystack=kind).accuracy
            model.train()
            tqdm.write(f"step {step + 1}: loss {value:.3f}, induction {log[-1]['induction']:.0%}, passkey@512 "
                       + ", ".join(f"{kind} {log[-1][f'passkey_512_{kind}']:.0%}" for kind in PROBE_HAYSTACKS))
        bar.set_postfix(loss=f"{value:.3f}")
    save(model, tok, recipe, out_dir)
    summary = {"recipe": recipe.name, "seed": seed, "steps": steps, "stages": [asdict(s) for s in recipe.stages], "seq_len": recipe.seq_len,
               "mix": asdict(recipe.mix), "tokens": recipe.tokens(steps),
               "train_seconds": time.perf_counter() - start, "machine": f"{machine_line()}; Python {platform.python_version()}", "log": log}
    (out_dir / "training_log.json").write_text(json.dumps(summary) + "\n", encoding="utf-8")
    plot_loss(log, out_dir / "loss_curve.png", recipe.name)
    return summary


def save(model: torch.nn.Module, tok: HFTokenizer, recipe: Recipe, out_dir: Path) -> None:
    """An HF folder: bf16 safetensors, config, generation config, tokenizer with the chat template."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(out_dir, safe_serialization=True)
    model.to(torch.float32)
    model.generation_config.bos_token_id, model.generation_config.eos_token_id, model.generation_config.pad_token_id = BOS_ID, EOS_ID, PAD_ID
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(recipe.config["max_position_embeddings"]), indent=2) + "\n")


def plot_loss(log: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loss = np.array([r["loss"] for r in log])
    window = max(1, len(loss) // 50)
    smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(loss, alpha=0.3, label="per step")
    ax.plot(np.arange(window - 1, len(loss)), smooth, label=f"mean of {window}")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats/token)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
