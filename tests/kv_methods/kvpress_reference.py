"""kvpress's answer for one press on one prompt, run in kvpress's own environment (.venv-kvpress, made by
scripts/setup_kvpress.sh): a subprocess of the KV-method tests, which compare kvtier's engine against it.

Reads a JSON request on stdin: {"model": folder, "press": class name, "kwargs": {...}, "prompt": [ids], "next": id}.
Prefills the prompt with the press applied (kvpress compresses the cache in each attention layer's forward hook),
then feeds ``next`` at the position after the prompt. Writes JSON: the kept prompt positions per layer and KV head
(found by matching each kept key row to the uncompressed prefill's keys) and the logits of that decode step.
"""

from __future__ import annotations

import json
import sys

import kvpress
import torch
from transformers import AutoModelForCausalLM, DynamicCache


def kept_positions(full: torch.Tensor, kept: torch.Tensor) -> list[list[int]]:
    """[1, H, S, D] and [1, H, n, D] -> for each head the sorted positions of ``full`` whose rows ``kept`` holds."""
    out = []
    for h in range(full.shape[1]):
        match = (kept[0, h][:, None, :] == full[0, h][None, :, :]).all(-1)  # [n, S]
        out.append(sorted(int(match[i].nonzero()[0, 0]) for i in range(match.shape[0])))
    return out


@torch.no_grad()
def main() -> None:
    req = json.load(sys.stdin)
    observed = req["press"] == "ObservedAttentionPress"  # scores the attention weights: eager attention must return them
    model = AutoModelForCausalLM.from_pretrained(req["model"], dtype=torch.float32, **({"attn_implementation": "eager"} if observed else {})).eval()
    ids = torch.tensor([req["prompt"]])
    full = DynamicCache()
    model(ids, past_key_values=full, use_cache=True)
    press = getattr(kvpress, req["press"])(**req["kwargs"])
    cache = DynamicCache()
    with press(model):
        model(ids, past_key_values=cache, use_cache=True, **({"output_attentions": True} if observed else {}))
    kept = [kept_positions(f.keys, c.keys) for f, c in zip(full.layers, cache.layers)]
    out = model(torch.tensor([[req["next"]]]), position_ids=torch.tensor([[len(req["prompt"])]]), past_key_values=cache, use_cache=True)
    json.dump({"kept": kept, "logits": out.logits[0, -1].tolist()}, sys.stdout)


if __name__ == "__main__":
    main()
