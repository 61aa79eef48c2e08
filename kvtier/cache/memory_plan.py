"""How the KV budget becomes blocks, per layer group; reported by ``kvtier info``.

The budget is split among groups in proportion to what one sequence of ``max_model_len`` tokens
takes in each (its bytes per token times the tokens it holds at once), so every group runs out at
the same number of longest sequences: a sliding-window group, which holds only its window and a
chunk, gets a small share and leaves the rest to full attention.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
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
    num_host_blocks: int

    @property
    def bytes_per_block(self) -> int:
        return self.group.bytes_per_token * self.group.spec.block_size


@dataclass(frozen=True)
class MemoryPlan:
    block_size: int
    budget_bytes: int
    groups: tuple[GroupPlan, ...]

    @property
    def bytes_per_token(self) -> int:
        """K and V of one token across all layers."""
        return sum(g.group.bytes_per_token for g in self.groups)

    @classmethod
    def split(cls, groups: Sequence[KVCacheGroup], budget_bytes: int, swap_bytes: int, max_model_len: int, max_chunk: int) -> MemoryPlan:
        weights = [g.bytes_per_token * g.spec.max_blocks(max_model_len, max_chunk) for g in groups]
        total = sum(weights)
        plans = []
        for g, w in zip(groups, weights):
            per_block = g.bytes_per_token * g.spec.block_size
            share, swap_share = budget_bytes * w // total, swap_bytes * w // total
            plans.append(GroupPlan(g, share, share // per_block, swap_share // per_block))
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
