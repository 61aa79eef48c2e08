"""What each group of layers keeps in the cache, per token: the input to memory planning and to the managers.

The model config yields one ``KVCacheGroup`` per set of layers with the same kind of cache (after
vLLM v1's KVCacheSpec): full attention keeps every token's K/V; a sliding-window layer needs only
the last ``window`` tokens; a Mamba2 layer keeps one fixed-size state per sequence, whatever its
length (one "block" of its own size); KCache's layers keep K in the device pool and V in a host tier, both
in blocks of the same table. A new kind of state is a new spec (with its own manager and storage where its
blocks behave differently), and nothing above the coordinator changes.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from kvtier.models.config import ModelConfig


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class KVCacheSpec(ABC):
    """What one layer of a group keeps per sequence; the coordinator picks the group's manager by the spec's class."""

    block_size: int

    @property
    @abstractmethod
    def bytes_per_token(self) -> int:
        """Bytes one token takes in one layer (0 for a per-sequence state)."""

    @property
    def bytes_per_block(self) -> int:
        """Bytes one block takes in one layer, in the device pool."""
        return self.bytes_per_token * self.block_size

    @property
    def tier_bytes_per_block(self) -> int:
        """Bytes one block takes in one layer in the host tier, beside its device bytes (V under KCache); 0 for most
        kinds. The swap pool is separate: a swapped block takes both."""
        return 0

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks a sequence's table holds to cover ``num_tokens`` tokens."""
        return blocks_needed(num_tokens, self.block_size)

    @abstractmethod
    def max_blocks(self, num_tokens: int, max_chunk: int) -> int:
        """The most blocks one sequence of ``num_tokens`` tokens holds at once, prefilled ``max_chunk`` tokens a step."""

    @property
    @abstractmethod
    def label(self) -> str:
        """The kind of cache, as ``kvtier info`` names it."""

    @property
    def sliding_window(self) -> int | None:
        """The window attention reads, or None for all tokens."""
        return None


@dataclass(frozen=True)
class FullAttentionSpec(KVCacheSpec):
    """One layer's K and V for every token of a sequence, in blocks of ``block_size`` tokens."""

    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    # what a KV method keeps beside K and V (kvtier.cache.layer_cache.LayerCache): an fp32 number per token and KV head
    # (H2O's accumulated attention), each block's elementwise min and max of its keys (Quest's), and each block's sum of
    # its values, kept where K is (KCache's residual)
    slot_stats: bool = False
    block_summary: bool = False
    value_sums: bool = False
    kv_method: bool = False  # the engine's KV method acts in these layers (MethodState.layers)

    @property
    def row_bytes(self) -> int:
        """One token's K (or V) in one layer: what a K or V row read costs."""
        return self.num_kv_heads * self.head_dim * self._element_size

    @property
    def bytes_per_token(self) -> int:
        """K and V of one token in one layer, and the method's numbers for it."""
        return 2 * self.row_bytes + self._stats_bytes

    @property
    def _stats_bytes(self) -> int:
        return self.num_kv_heads * 4 if self.slot_stats else 0

    @property
    def bytes_per_block(self) -> int:
        summary = (2 * self.block_summary + self.value_sums) * self.row_bytes
        return self.bytes_per_token * self.block_size + summary

    @property
    def _element_size(self) -> int:
        return self.dtype.itemsize

    def max_blocks(self, num_tokens: int, max_chunk: int) -> int:
        return blocks_needed(num_tokens, self.block_size)

    @property
    def label(self) -> str:
        return "full attention"


@dataclass(frozen=True)
class SlidingWindowSpec(FullAttentionSpec):
    """A layer whose queries see only the last ``window`` keys (their own included), as HF's Mistral masks them."""

    window: int = 0

    def max_blocks(self, num_tokens: int, max_chunk: int) -> int:
        # the window behind a chunk's first query, the chunk, and one block of misalignment at each end
        return min(blocks_needed(num_tokens, self.block_size), blocks_needed(self.window - 1 + max_chunk, self.block_size) + 1)

    @property
    def label(self) -> str:
        return f"sliding window {self.window}"

    @property
    def sliding_window(self) -> int | None:
        return self.window


@dataclass(frozen=True)
class HostValueSpec(FullAttentionSpec):
    """KCache's layers: K (and a method's numbers) in the device pool, V in a host tier; one block id names both, so
    block tables, copy-on-write, prefix sharing and swap treat the pair as one block. ``bytes_per_token`` is the device
    side only, which is what the device budget buys."""

    @property
    def bytes_per_token(self) -> int:
        return self.row_bytes + self._stats_bytes

    @property
    def tier_bytes_per_block(self) -> int:
        return self.row_bytes * self.block_size

    @property
    def label(self) -> str:
        return "full attention, V in the host tier"


@dataclass(frozen=True)
class MambaSpec(KVCacheSpec):
    """One Mamba2 layer's state for a sequence: the conv window and the SSM state, held in one slot (a block of
    the group's pool) from the first token to the last, whatever the length."""

    block_size: int  # the engine's, so prefix-hit arithmetic stays uniform; a slot holds no tokens
    conv_shape: tuple[int, ...]
    ssm_shape: tuple[int, ...]
    conv_dtype: torch.dtype
    ssm_dtype: torch.dtype

    @property
    def bytes_per_token(self) -> int:
        return 0

    @property
    def bytes_per_block(self) -> int:
        """One slot: the conv state and the SSM state of one layer."""
        return sum(math.prod(shape) * torch.tensor([], dtype=dt).element_size()
                   for shape, dt in ((self.conv_shape, self.conv_dtype), (self.ssm_shape, self.ssm_dtype)))

    def blocks_for(self, num_tokens: int) -> int:
        return 1 if num_tokens > 0 else 0

    def max_blocks(self, num_tokens: int, max_chunk: int) -> int:
        return 1

    @property
    def label(self) -> str:
        return "mamba2 state"


@dataclass(frozen=True)
class KVCacheGroup:
    """Layers (by index in the model) that share one spec, and so one block table per sequence."""

    spec: KVCacheSpec
    layers: tuple[int, ...]

    @property
    def bytes_per_token(self) -> int:
        return self.spec.bytes_per_token * len(self.layers)

    @property
    def bytes_per_block(self) -> int:
        return self.spec.bytes_per_block * len(self.layers)

    @property
    def tier_bytes_per_block(self) -> int:
        return self.spec.tier_bytes_per_block * len(self.layers)


@dataclass(frozen=True)
class MethodState:
    """What the engine's KV method keeps in the full-attention layers it acts in (``layers``): an fp32 number per token
    and KV head (H2O's accumulated attention), each block's elementwise key min and max (Quest's), V in the host tier
    and each block's V sum beside K (KCache's). The other layers keep plain K and V."""

    layers: frozenset[int]
    slot_stats: bool = False
    block_summary: bool = False
    host_values: bool = False
    value_sums: bool = False


def kv_cache_groups(cfg: ModelConfig, block_size: int, dtype: torch.dtype,
                    mamba_dtypes: tuple[torch.dtype, torch.dtype] | None = None, method: MethodState | None = None) -> list[KVCacheGroup]:
    """One group per distinct per-layer cache kind, in order of first appearance. A hybrid's Mamba2 layers keep
    their conv and SSM states in ``mamba_dtypes`` (default: ``dtype``); ``method``: what the engine's KV method keeps."""
    layers: dict[KVCacheSpec, list[int]] = {}
    for i, window in enumerate(cfg.sliding_windows):
        if i in cfg.mlp_layers:
            continue
        if i in cfg.mamba_layers:
            m = cfg.mamba
            conv_dtype, ssm_dtype = mamba_dtypes or (dtype, dtype)
            spec: KVCacheSpec = MambaSpec(block_size, (m.conv_dim, m.conv_kernel - 1), (m.num_heads, m.head_dim, m.state_size), conv_dtype, ssm_dtype)
        elif window is None and method is not None and i in method.layers:
            kind = HostValueSpec if method.host_values else FullAttentionSpec
            spec = kind(block_size, cfg.num_key_value_heads, cfg.head_dim, dtype, method.slot_stats, method.block_summary, method.value_sums,
                        kv_method=True)
        elif window is None:
            spec = FullAttentionSpec(block_size, cfg.num_key_value_heads, cfg.head_dim, dtype)
        else:
            spec = SlidingWindowSpec(block_size, cfg.num_key_value_heads, cfg.head_dim, dtype, window=window)
        layers.setdefault(spec, []).append(i)
    return [KVCacheGroup(spec, tuple(ids)) for spec, ids in layers.items()]
