"""The physical K/V tensors: per layer group, one device pool and one host pool, sized by the memory plan."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvtier.cache.memory_plan import MemoryPlan
from kvtier.cache.ops import CacheOps


class KVStorage:
    """Per group, K and V of its layers as [layers, 2, kv_heads, num_blocks * block_size, head_dim]; a block id means
    the same slots in every layer of its group."""

    def __init__(self, plan: MemoryPlan, device: torch.device) -> None:
        self.block_size = plan.block_size
        self.device_kv: list[torch.Tensor] = []
        self.host_kv: list[torch.Tensor] = []
        self._layers: dict[int, tuple[int, int]] = {}  # model layer -> (group, index in group)
        pin = device.type == "cuda"
        for g, gp in enumerate(plan.groups):
            spec = gp.group.spec
            shape = (len(gp.group.layers), 2, spec.num_kv_heads)
            # zeros, not empty: padded gathers read unused slots, and NaN garbage would leak through masks
            self.device_kv.append(torch.zeros(*shape, gp.num_blocks * self.block_size, spec.head_dim, dtype=spec.dtype, device=device))
            self.host_kv.append(torch.zeros(*shape, gp.num_host_blocks * self.block_size, spec.head_dim, dtype=spec.dtype, pin_memory=pin))
            self._layers.update({layer: (g, i) for i, layer in enumerate(gp.group.layers)})

    def layer_caches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(K, V) of every model layer, in layer order."""
        return [(self.device_kv[g][i, 0], self.device_kv[g][i, 1]) for _, (g, i) in sorted(self._layers.items())]

    def layer_groups(self) -> list[int]:
        """The group of every model layer, in layer order."""
        return [g for _, (g, _) in sorted(self._layers.items())]

    def _slots(self, blocks: list[int], device: torch.device) -> torch.Tensor:
        ids = torch.tensor(blocks, dtype=torch.long, device=device)
        return (ids[:, None] * self.block_size + torch.arange(self.block_size, device=device)).flatten()

    def _move(self, src: torch.Tensor, dst: torch.Tensor, pairs: list[tuple[int, int]]) -> None:
        s = self._slots([p[0] for p in pairs], src.device)
        d = self._slots([p[1] for p in pairs], dst.device)
        dst[:, :, :, d] = src[:, :, :, s].to(dst.device)

    def apply(self, ops: Sequence[CacheOps]) -> None:
        """Do each group's moves in the order they were decided, one batch per run (see ``CacheOps.runs``)."""
        for dev, host, group_ops in zip(self.device_kv, self.host_kv, ops):
            spaces = {"copy": (dev, dev), "swap_out": (dev, host), "swap_in": (host, dev)}
            for kind, pairs in group_ops.runs():
                self._move(*spaces[kind], pairs)
