"""How the KV budget becomes blocks, per layer group; reported by ``kvtier info``.

The budget is split among groups in proportion to what one sequence of ``max_model_len`` tokens
takes in each (the bytes of the blocks it holds at once), so every group runs out at the same number
of longest sequences: a sliding-window group, which holds only its window and a chunk, gets a small
share and leaves the rest to full attention; a hybrid's Mamba2 state group gets one slot's bytes per
longest sequence. ``mamba_full_memory_ratio`` (SGLang's flag: state bytes over K/V bytes) sets the
state groups' share instead.

KCache's layers keep V in a host tier with its own budget (``kv_host_memory``), split among such groups the same
way; one block id names a K block and a V block, so a group has as many blocks as the smaller side holds. Without a
host budget the tier holds V for every device block. The swap pool is a third budget: a swapped block takes its
device bytes and its tier bytes there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING

import torch

from kvtier.cache.specs import KVCacheGroup
from kvtier.models.config import ModelConfig

if TYPE_CHECKING:
    from kvtier.config import EngineArgs


@dataclass(frozen=True)
class GroupPlan:
    group: KVCacheGroup
    budget_bytes: int
    num_blocks: int
    num_host_blocks: int  # the swap pool's
    tier_budget_bytes: int = 0  # the host tier's share (V under KCache)

    @property
    def bytes_per_block(self) -> int:
        return self.group.bytes_per_block

    @property
    def tier_blocks(self) -> int | None:
        """The blocks the host tier's budget holds; None where the group has no tier."""
        per_block = self.group.tier_bytes_per_block
        return self.tier_budget_bytes // per_block if per_block else None


@dataclass(frozen=True)
class MemoryPlan:
    block_size: int
    budget_bytes: int
    groups: tuple[GroupPlan, ...]

    @property
    def bytes_per_token(self) -> int:
        """The device bytes of one token across all layers: K and V (only K where V is in the host tier), and a KV method's
        numbers."""
        return sum(g.group.bytes_per_token for g in self.groups)

    @property
    def tier_bytes_per_token(self) -> int:
        """The host tier's bytes of one token across all layers (V under KCache)."""
        return sum(g.group.tier_bytes_per_block // self.block_size for g in self.groups)

    @classmethod
    def split(cls, groups: Sequence[KVCacheGroup], budget_bytes: int, swap_bytes: int, max_model_len: int, max_chunk: int,
              mamba_full_memory_ratio: float | None = None, tier_bytes: int | None = None) -> MemoryPlan:
        weights = [g.bytes_per_block * g.spec.max_blocks(max_model_len, max_chunk) for g in groups]
        tier_weights = [g.tier_bytes_per_block * g.spec.max_blocks(max_model_len, max_chunk) for g in groups]
        state = [g.bytes_per_token == 0 for g in groups]  # per-sequence state, no per-token K/V
        if mamba_full_memory_ratio is not None and any(state) and not all(state):
            ratio = Fraction(mamba_full_memory_ratio)
            totals = {True: sum(w for w, s in zip(weights, state) if s), False: sum(w for w, s in zip(weights, state) if not s)}
            shares = [(ratio if s else 1) / (1 + ratio) * Fraction(w, totals[s]) for w, s in zip(weights, state)]
        else:
            shares = [Fraction(w, sum(weights)) for w in weights]
        plans = []
        for g, share, tier_weight in zip(groups, shares, tier_weights):
            budget, swap = math.floor(budget_bytes * share), math.floor(swap_bytes * share)
            blocks = budget // g.bytes_per_block
            tier = 0
            if tier_weight:
                tier = blocks * g.tier_bytes_per_block if tier_bytes is None else math.floor(Fraction(tier_bytes) * Fraction(tier_weight, sum(tier_weights)))
                blocks = min(blocks, tier // g.tier_bytes_per_block)
            plans.append(GroupPlan(g, budget, blocks, swap // (g.bytes_per_block + g.tier_bytes_per_block), tier))
        return cls(groups[0].spec.block_size, budget_bytes, tuple(plans))


def kv_budget_bytes(args: EngineArgs, cfg: ModelConfig, device: torch.device) -> int:
    """Bytes for the KV cache: ``kv_cache_memory`` if given; on a GPU what ``gpu_memory_utilization`` leaves after
    weights and activations; else 1 GiB."""
    if args.kv_cache_memory is not None:
        return args.kv_cache_memory
    if device.type != "cuda":
        return 1 << 30  # 1 GiB
    free, total = torch.cuda.mem_get_info(device)
    # activations: a step's hidden states and MLP, plus fp32 logits for every running sequence
    act = (args.max_num_batched_tokens or 2048) * (cfg.hidden_size * 8 + cfg.intermediate_size * 4) * 4
    act += args.max_num_seqs * cfg.vocab_size * 4 * 3
    # leave (1 - utilization) of the whole GPU free, counting what others already hold
    return max(0, free - int(total * (1 - args.gpu_memory_utilization)) - act)
