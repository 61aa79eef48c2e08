"""Linear layers whose weights oneDNN has laid out in advance for the CPU it runs on (what vLLM's CPU build and
inductor's freezing do): the same product as ``nn.Linear`` in another summation order, faster at every batch size on
the machines measured (``benchmarks/profile_step.py``). fp32 on CPU only; the original weight stays where it was, for
whoever reads it (tied embeddings, weight export)."""

from __future__ import annotations

import torch
from torch import nn


class PackedLinear(nn.Module):
    def __init__(self, linear: nn.Linear, batch_hint: int) -> None:
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), batch_hint), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def pack_linears(model: nn.Module, batch_hint: int) -> int:
    """Replace every fp32 CPU ``nn.Linear`` of ``model`` by a ``PackedLinear`` (``batch_hint``: the rows oneDNN tunes
    the layout for); returns how many, 0 where oneDNN is not available."""
    if not torch.backends.mkldnn.is_available():
        return 0
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if type(child) is nn.Linear and child.weight.dtype == torch.float32 and child.weight.device.type == "cpu"]
    for parent, name, child in swaps:
        setattr(parent, name, PackedLinear(child, batch_hint))
    return len(swaps)
