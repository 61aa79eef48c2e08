"""The physical cache tensors: per layer group, its pools (V in the host tier for KCache's layers) and a swap pool, sized
by the memory plan.

Each group's tensors are laid out by its kind: attention groups keep K and V in token slots of blocks,
Mamba2 groups keep a conv and an SSM state per slot. Both answer the same two questions (each layer's
pair of tensors, and how to do a batch of block moves), so the runner and the worker need not know which.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import NamedTuple

import torch

from kvtier.cache import huge_pages
from kvtier.cache.layer_cache import LayerCache, add_value_sums, summarize_blocks
from kvtier.cache.memory_plan import GroupPlan, MemoryPlan
from kvtier.cache.ops import CacheOps, Compaction, MoveKind, block_slots
from kvtier.cache.specs import FullAttentionSpec, HostValueSpec, KVCacheSpec, MambaSpec, SlidingWindowSpec


class GroupStorage(ABC):
    @abstractmethod
    def layer_caches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The pair of tensors each layer of the group reads and writes, in the group's layer order."""

    @abstractmethod
    def move(self, kind: MoveKind, pairs: list[tuple[int, int]]) -> None:
        """Copy blocks ``src -> dst`` within the device pool (copy) or between device and host (swap)."""

    @abstractmethod
    def tensors(self) -> list[torch.Tensor]:
        """The group's device tensors, then its host tensors."""

    def compact(self, compaction: Compaction) -> None:
        """Gather a KV method's kept tokens into their new slots; only token-holding groups have tokens to keep."""
        raise TypeError(f"{type(self).__name__} holds no tokens to compact")


class _Pool(NamedTuple):
    """One tensor of an attention group, [layers, kv_heads, rows, ...] with rows a token slot (K, V, per-slot stats) or
    a block (key summaries, value sums), in its home tier and in the swap pool."""

    home: torch.Tensor
    swap: torch.Tensor
    per_block: bool = False


class AttentionStorage(GroupStorage):
    """K and V of the group's layers, each [layers, kv_heads, num_blocks * block_size, head_dim]; a block id means the same
    slots in every layer of the group. V lives in the host tier (pinned memory beside a GPU) where the spec says so
    (KCache), K always where attention runs. What the spec asks a KV method to keep beside them (per-slot stats, per-block
    key summaries and value sums, all where K is) is laid out the same way; every pool moves with its block."""

    def __init__(self, gp: GroupPlan, block_size: int, device: torch.device) -> None:
        spec: FullAttentionSpec = gp.group.spec
        self.block_size = block_size
        layers, heads, pin = len(gp.group.layers), spec.num_kv_heads, device.type == "cuda"
        slots, host_slots = gp.num_blocks * block_size, gp.num_host_blocks * block_size
        tier = torch.device("cpu") if isinstance(spec, HostValueSpec) else device

        def pool(rows: int, host_rows: int, tail: tuple[int, ...], dtype: torch.dtype, home: torch.device = device, per_block: bool = False) -> _Pool:
            # zeros, not empty: padded gathers read unused slots, and NaN garbage would leak through masks
            return _Pool(huge_pages.zeros(layers, heads, rows, *tail, dtype=dtype, device=home, pin_memory=pin and home.type == "cpu"),
                         huge_pages.zeros(layers, heads, host_rows, *tail, dtype=dtype, device=torch.device("cpu"), pin_memory=pin), per_block)

        self.k = pool(slots, host_slots, (spec.head_dim,), spec.dtype)
        self.v = pool(slots, host_slots, (spec.head_dim,), spec.dtype, tier)
        self.stats = pool(slots, host_slots, (), torch.float32) if spec.slot_stats else None
        self.summary = pool(gp.num_blocks, gp.num_host_blocks, (2, spec.head_dim), spec.dtype, per_block=True) if spec.block_summary else None
        self.value_sums = pool(gp.num_blocks, gp.num_host_blocks, (spec.head_dim,), spec.dtype, per_block=True) if spec.value_sums else None
        self.pools = [p for p in (self.k, self.v, self.stats, self.summary, self.value_sums) if p is not None]

    def layer_caches(self) -> list[LayerCache]:
        def layer(p: _Pool | None, i: int) -> torch.Tensor | None:
            return None if p is None else p.home[i]

        return [LayerCache(self.k.home[i], self.v.home[i], layer(self.stats, i), layer(self.summary, i), layer(self.value_sums, i), i)
                for i in range(self.k.home.shape[0])]

    def tensors(self) -> list[torch.Tensor]:
        return [t for p in self.pools for t in (p.home, p.swap)]

    def move(self, kind: MoveKind, pairs: list[tuple[int, int]]) -> None:
        blocks = torch.tensor(pairs, dtype=torch.long).T  # [2, moves]: sources, destinations
        slots = block_slots(blocks, self.block_size)
        for p in self.pools:
            src, dst = _spaces(p.home, p.swap)[kind]
            s, d = blocks if p.per_block else slots
            dst[:, :, d.to(dst.device)] = src[:, :, s.to(src.device)].to(dst.device)

    def compact(self, compaction: Compaction) -> None:
        heads = torch.arange(compaction.src.shape[1])[:, None]
        for layer in range(self.k.home.shape[0]):
            for p in self.pools:
                if not p.per_block:
                    t = p.home[layer]  # [kv_heads, slots, ...]; the gather copies every kept row before the write
                    t[:, compaction.dst.to(t.device)] = t[heads.to(t.device), compaction.src[layer].to(t.device)]
            dst = compaction.dst.to(self.k.home.device)
            if self.summary is not None:
                summarize_blocks(self.k.home[layer], self.summary.home[layer], dst)
            if self.value_sums is not None:
                v = self.v.home[layer]
                add_value_sums(self.value_sums.home[layer], v[:, compaction.dst.to(v.device)].to(dst.device), dst, self.block_size)


class StateStorage(GroupStorage):
    """The conv states [layers, slots, conv_dim, K-1] and SSM states [layers, slots, H, P, N] of a Mamba2 group."""

    def __init__(self, gp: GroupPlan, block_size: int, device: torch.device) -> None:
        spec: MambaSpec = gp.group.spec
        layers, pin = len(gp.group.layers), device.type == "cuda"
        self.device = [torch.zeros(layers, gp.num_blocks, *shape, dtype=dt, device=device)
                       for shape, dt in ((spec.conv_shape, spec.conv_dtype), (spec.ssm_shape, spec.ssm_dtype))]
        self.host = [torch.zeros(layers, gp.num_host_blocks, *shape, dtype=dt, pin_memory=pin)
                     for shape, dt in ((spec.conv_shape, spec.conv_dtype), (spec.ssm_shape, spec.ssm_dtype))]

    def layer_caches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        conv, ssm = self.device
        return [(conv[i], ssm[i]) for i in range(conv.shape[0])]

    def tensors(self) -> list[torch.Tensor]:
        return [*self.device, *self.host]

    def move(self, kind: MoveKind, pairs: list[tuple[int, int]]) -> None:
        for dev, host in zip(self.device, self.host):
            src, dst = _spaces(dev, host)[kind]
            s = torch.tensor([p[0] for p in pairs], dtype=torch.long, device=src.device)
            d = torch.tensor([p[1] for p in pairs], dtype=torch.long, device=dst.device)
            dst[:, d] = src[:, s].to(dst.device)


def _spaces(device: torch.Tensor, host: torch.Tensor) -> dict[MoveKind, tuple[torch.Tensor, torch.Tensor]]:
    return {"copy": (device, device), "swap_out": (device, host), "swap_in": (host, device)}


STORAGES: dict[type[KVCacheSpec], type[GroupStorage]] = {
    FullAttentionSpec: AttentionStorage,
    SlidingWindowSpec: AttentionStorage,
    HostValueSpec: AttentionStorage,
    MambaSpec: StateStorage,
}


class KVStorage:
    """Every layer group's storage, and which group and index each model layer has."""

    def __init__(self, plan: MemoryPlan, device: torch.device) -> None:
        self.block_size = plan.block_size
        self.groups = [STORAGES[type(gp.group.spec)](gp, plan.block_size, device) for gp in plan.groups]
        self._layers: dict[int, tuple[int, int]] = {}  # model layer -> (group, index in group)
        for g, gp in enumerate(plan.groups):
            self._layers.update({layer: (g, i) for i, layer in enumerate(gp.group.layers)})

    def layer_caches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each model layer's pair of tensors ((K, V), or (conv, SSM) state), in layer order."""
        per_group = [g.layer_caches() for g in self.groups]
        return [per_group[g][i] for _, (g, i) in sorted(self._layers.items())]

    def layer_groups(self) -> list[int]:
        """The group of every model layer, in layer order."""
        return [g for _, (g, _) in sorted(self._layers.items())]

    def tensors(self) -> list[torch.Tensor]:
        """Every device and host tensor of every group, in a fixed order: what a snapshot of the cache copies."""
        return [t for g in self.groups for t in g.tensors()]

    def apply(self, ops: Sequence[CacheOps]) -> None:
        """Do each group's moves and compactions in the order they were decided, one batch per run (see ``CacheOps.runs``)."""
        for storage, group_ops in zip(self.groups, ops):
            for run in group_ops.runs():
                if isinstance(run, Compaction):
                    storage.compact(run)
                else:
                    storage.move(*run)
