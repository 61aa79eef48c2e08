"""The model's elementwise work between the matmuls done by kvtier's C++ kernels (``kvtier/kernels/csrc/fused_ops.cpp``):
RMSNorm, SiLU-and-mul and rotary embeddings, one pass over memory each instead of five to eight eager operators. The
``cpu`` attention backend swaps them in when it prepares a model; each falls back to the module it replaced for
inputs the kernels do not take (not fp32, not on the CPU), so the result is the reference one either way."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import torch
from torch import nn

from kvtier.models.layers import GatedMLP, RMSNorm
from kvtier.models.rope import RotaryEmbedding


def _native(x: torch.Tensor) -> bool:
    return x.dtype == torch.float32 and x.device.type == "cpu"


class NativeRMSNorm(RMSNorm):
    def __init__(self, norm: RMSNorm, kernels: ModuleType) -> None:
        super().__init__(norm.weight.shape[0], norm.eps)
        self.weight = norm.weight
        self.kernels = kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _native(x) and _native(self.weight):
            return self.kernels.rms_norm(x, self.weight, self.eps)
        return super().forward(x)


class NativeRotaryEmbedding(RotaryEmbedding):
    """Rotates q and k in place (they are views into the fused qkv projection's fresh output)."""

    def __init__(self, rotary: RotaryEmbedding, kernels: ModuleType) -> None:
        nn.Module.__init__(self)  # the tables are the replaced module's, not computed again
        self.rotary_dim = rotary.rotary_dim
        self.register_buffer("cos", rotary.cos, persistent=False)
        self.register_buffer("sin", rotary.sin, persistent=False)
        self.kernels = kernels

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if _native(q) and _native(k) and _native(self.cos):
            self.kernels.rotary_(q, k, positions, self.cos, self.sin)
            return q, k
        return super().forward(positions, q, k)


def _native_silu_and_mul(kernels: ModuleType, reference: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    def act_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
        return kernels.silu_and_mul(gate_up) if _native(gate_up) and gate_up.dim() == 2 else reference(gate_up)

    return act_and_mul


def fuse_elementwise(model: nn.Module, kernels: ModuleType) -> int:
    """Swap ``model``'s RMSNorms and rotary embeddings for the native ones and give its gated MLPs the fused SiLU-and-mul;
    returns how many modules changed. A module shared by several parents (one rotary table for every layer) stays shared."""
    replaced: dict[int, nn.Module] = {}
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if type(child) in (RMSNorm, RotaryEmbedding)]
    for parent, name, child in swaps:
        if id(child) not in replaced:
            cls = NativeRMSNorm if type(child) is RMSNorm else NativeRotaryEmbedding
            replaced[id(child)] = cls(child, kernels)
        setattr(parent, name, replaced[id(child)])
    mlps = [m for m in model.modules() if isinstance(m, GatedMLP)]
    for mlp in mlps:
        mlp.act_and_mul = _native_silu_and_mul(kernels, mlp.act_and_mul)
    return len(replaced) + len(mlps)
