"""The physical K/V tensors: one device pool and one host pool, sized once from a memory budget."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvtier.cache.ops import CacheOps


@dataclass(frozen=True)
class MemoryPlan:
    """How the KV budget becomes blocks; reported by ``kvtier info``."""

    block_size: int
    bytes_per_token: int
    budget_bytes: int
    num_blocks: int
    num_host_blocks: int

    @property
    def bytes_per_block(self) -> int:
        return self.bytes_per_token * self.block_size

    @classmethod
    def from_budget(cls, budget_bytes: int, swap_bytes: int, block_size: int, bytes_per_token: int) -> MemoryPlan:
        per_block = bytes_per_token * block_size
        return cls(block_size, bytes_per_token, budget_bytes, budget_bytes // per_block, swap_bytes // per_block)


class KVStorage:
    """Per layer, K and V as [kv_heads, num_blocks * block_size, head_dim] views of one allocation."""

    def __init__(self, plan: MemoryPlan, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        slots = plan.num_blocks * plan.block_size
        self.block_size = plan.block_size
        # zeros, not empty: padded gathers read unused slots, and NaN garbage would leak through masks
        self.device_kv = torch.zeros(num_layers, 2, num_kv_heads, slots, head_dim, dtype=dtype, device=device)
        host_slots = plan.num_host_blocks * plan.block_size
        pin = device.type == "cuda"
        self.host_kv = torch.zeros(num_layers, 2, num_kv_heads, host_slots, head_dim, dtype=dtype, pin_memory=pin)

    def layer_caches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(layer[0], layer[1]) for layer in self.device_kv]

    def _slots(self, blocks: list[int], device: torch.device) -> torch.Tensor:
        ids = torch.tensor(blocks, dtype=torch.long, device=device)
        return (ids[:, None] * self.block_size + torch.arange(self.block_size, device=device)).flatten()

    def _move(self, src: torch.Tensor, dst: torch.Tensor, pairs: list[tuple[int, int]]) -> None:
        if not pairs:
            return
        s = self._slots([p[0] for p in pairs], src.device)
        d = self._slots([p[1] for p in pairs], dst.device)
        dst[:, :, :, d] = src[:, :, :, s].to(dst.device)

    def apply(self, ops: CacheOps) -> None:
        """Do the moves in the order they were decided, one batch per run (see ``CacheOps.runs``)."""
        spaces = {"copy": (self.device_kv, self.device_kv), "swap_out": (self.device_kv, self.host_kv), "swap_in": (self.host_kv, self.device_kv)}
        for kind, pairs in ops.runs():
            self._move(*spaces[kind], pairs)
