"""Filling a model from HF-named checkpoint tensors, fusing the projections our modules pack into one matmul.

A packed module (q/k/v into ``qkv_proj``, gate/up into ``gate_up_proj``) says how its fused weight splits
(``shard_sizes()``); every other parameter takes its tensor whole. Every parameter must be filled once.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

# HF parameter name fragment -> (our fused parameter, shard index)
PACKED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}
_FUSED = {fused for fused, _ in PACKED.values()}


def _shard_count(name: str) -> int | None:
    fused = name.split(".")[-2] if "." in name else ""
    return sum(1 for f, _ in PACKED.values() if f == fused) if fused in _FUSED else None


def load_hf_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]], tied_lm_head: bool) -> None:
    """Copy ``weights`` (HF names, ``model.`` or ``backbone.`` prefix optional) into ``model``'s parameters. A projection
    is packed only where ``model`` has the fused parameter (NemotronH's ``up_proj`` stands alone)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    filled: set[tuple[str, int | None]] = set()
    for hf_name, tensor in weights:
        name = hf_name.removeprefix("model.").removeprefix("backbone.")
        if "rotary_emb.inv_freq" in name or (name == "lm_head.weight" and tied_lm_head):
            continue
        target, shard = name, None
        for frag, (fused, idx) in PACKED.items():
            if f".{frag}." in name and name.replace(frag, fused) in params:
                target, shard = name.replace(frag, fused), idx
                break
        if target not in params:
            raise KeyError(f"checkpoint tensor {hf_name!r} has no place in {type(model).__name__}")
        dst = params[target].data
        if shard is not None:
            sizes = model.get_submodule(target.rsplit(".", 2)[0]).shard_sizes()
            dst = dst.narrow(0, sum(sizes[:shard]), sizes[shard])
        if dst.shape != tensor.shape:
            raise ValueError(f"checkpoint tensor {hf_name!r} has shape {tuple(tensor.shape)}, expected {tuple(dst.shape)}")
        dst.copy_(tensor)
        filled.add((target, shard))
    expected = [(n, s) for n in params if not (n == "lm_head.weight" and tied_lm_head)
                for s in (range(_shard_count(n)) if _shard_count(n) else [None])]
    missing = [_hf_name(n, s) for n, s in expected if (n, s) not in filled]
    if missing:
        raise KeyError(f"checkpoint lacks tensors: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")


def _hf_name(name: str, shard: int | None) -> str:
    """Our (parameter, shard) back to the checkpoint's tensor name."""
    for frag, (fused, idx) in PACKED.items():
        if f".{fused}." in name and idx == shard:
            name = name.replace(fused, frag)
            break
    return name if name.startswith("lm_head") else "model." + name
