"""Per-step attention metadata: where new K/V go and which cache blocks each query reads.

Built once per engine step and layer group by the attention backend and shared by every layer of
the group, so the per-layer work is only gathers and matmuls. A sliding-window group reads only the
blocks its window reaches: its gathers start at ``key_start``, not at position 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from kvtier.cache.layer_cache import LayerCache


@dataclass(frozen=True)
class ScheduledTokens:
    """One sequence's new tokens of a step, as plain data: their ids, the position of the first, and per layer group the
    block table of its K/V (-1 where a block fell out of a window and is read by no query). ``slot_start`` is the cache
    slot of the first: its position, less the tokens a KV method evicted (positions drive RoPE, slots the cache)."""

    seq_id: int
    token_ids: list[int]
    start: int
    block_ids: tuple[list[int], ...]
    num_evicted: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def slot_start(self) -> int:
        return self.start - self.num_evicted


@dataclass
class PrefillSpan:
    """One sequence's chunk of new tokens (query length > 1) in the flattened batch."""

    start: int  # offset of the chunk in the flattened token batch
    query_len: int
    context_len: int  # cached + new tokens up to the chunk's end
    slots: torch.Tensor | None  # [context_len - key_start] cache slots to gather; None when the keys are the chunk itself
    positions: torch.Tensor  # [query_len] cache slots of the chunk's tokens (their positions, unless a KV method evicted tokens)
    key_start: int = 0  # position of the first gathered key (a window's first block)
    _mask: torch.Tensor | None = field(default=None, repr=False)

    def mask(self, window: int | None) -> torch.Tensor | None:
        """[query_len, context_len - key_start] the keys each query may see (causal, and within ``window``); None when
        that is plain causal attention over the chunk itself (query i sees keys 0..i), which attention kernels do without
        a mask. Built once per step and shared by the group's layers."""
        if self._mask is None and not self._plain_causal(window):
            key_pos = torch.arange(self.key_start, self.context_len, device=self.positions.device)
            q_pos = self.positions[:, None]
            mask = key_pos[None, :] <= q_pos
            if window is not None:
                mask &= key_pos[None, :] > q_pos - window
            self._mask = mask
        return self._mask

    def _plain_causal(self, window: int | None) -> bool:
        return ((window is None or window >= self.context_len) and self.key_start == 0 and self.query_len == self.context_len
                and int(self.positions[-1]) == self.context_len - 1)


@dataclass
class DecodeGroup:
    """Decode tokens of similar context length, padded to the group's longest block table."""

    start: int  # offset of the group's first token in the flattened batch
    block_ids: torch.Tensor  # [size * max_blocks] flattened block tables (from each key_start), padded with block 0
    context_lens: torch.Tensor  # [size]
    positions: torch.Tensor  # [size] each query's cache slot (its position, unless a KV method evicted tokens)
    block_size: int
    window: int | None = None
    key_starts: torch.Tensor | None = None  # [size] position of each row's first gathered key; None: all 0
    num_tokens: torch.Tensor | None = None  # [size] tokens each row has computed, its own included; None: context_lens
    _mask: torch.Tensor | None = field(default=None, repr=False)

    @property
    def size(self) -> int:
        return self.context_lens.numel()

    def key_positions(self) -> torch.Tensor:
        """[size, L] the token position of every gathered key."""
        num_keys = self.block_ids.numel() // self.size * self.block_size
        key_pos = torch.arange(num_keys, device=self.context_lens.device)[None, :]
        return key_pos + self.key_starts[:, None] if self.key_starts is not None else key_pos.expand(self.size, -1)

    def mask(self) -> torch.Tensor:
        """[size, 1, L] keys each query may see; built once per step."""
        if self._mask is None:
            key_pos = self.key_positions()
            mask = key_pos < self.context_lens[:, None]
            if self.window is not None:
                mask &= key_pos > (self.positions[:, None] - self.window)
            self._mask = mask[:, None, :]
        return self._mask


@dataclass
class AttentionMetadata:
    """Tokens are laid out decodes first (one token each, grouped by length), then prefill chunks."""

    slot_mapping: torch.Tensor  # [T] flat cache slot of every new token
    num_decode_tokens: int
    decode_groups: list[DecodeGroup]
    prefills: list[PrefillSpan]
    window: int | None = None  # the group's sliding window; None for full attention
    # set to [] by a caller that wants a decode step's attention probabilities (a KV method scoring keys): each layer of
    # the group appends, per decode group, the softmax over its gathered keys, [size, heads, L] in fp32
    decode_probs: list[list[torch.Tensor]] | None = None
    # rows of the step's batch whose queries (after RoPE) a KV method reads, set by the runner: each layer of the group
    # appends q at those rows, [rows, heads, head_dim]
    query_rows: torch.Tensor | None = None
    queries: list[torch.Tensor] | None = None
    # the engine's KV method when it acts inside decode attention (chooses the blocks each KV head reads, or scores keys)
    kv_method: DecodeHooks | None = None


@dataclass(frozen=True)
class BlockSelection:
    """The blocks each KV head of a decode group reads, chosen by a KV method: per head, every row's chosen block ids
    and which of their keys the row may see."""

    block_ids: torch.Tensor  # [kv_heads, size * chosen] flattened like DecodeGroup.block_ids
    mask: torch.Tensor  # [kv_heads, size, 1, chosen * block_size]


@dataclass(frozen=True)
class ValueSelection:
    """A KV method's decode read said plainly, so that a backend can do it in its own kernel: every key scored, the
    softmax over all of them, then only the ``budget`` most probable V rows read (a count, or a fraction of the
    context), per query head or per KV head (by the group's highest probability), their probabilities renormalised
    over the rows read or not; with ``residual``, the mass of the rows not read goes, block by block, to the block's mean
    value (its V sum in ``LayerCache.value_sums`` over its tokens). KCache's read (``kvtier.kv_methods.kcache``)."""

    budget: int | float
    per_kv_head: bool
    renormalize: bool
    residual: bool = False

    def counts(self, context_lens: torch.Tensor) -> torch.Tensor:
        """The V rows each decode row reads, [rows] int64."""
        if isinstance(self.budget, float) and self.budget <= 1:
            return (context_lens * self.budget).floor().long().clamp(min=1)
        return context_lens.clamp(max=int(self.budget))


class DecodeHooks(Protocol):
    """What a KV method does inside a decode step's attention, layer by layer (``kvtier.kv_methods.base.KVMethod``)."""

    name: str
    observes_decode: bool
    reads_values: bool
    value_selection: ValueSelection | None  # set where ``read_values`` is exactly this selection (and nothing else acts)

    def select_blocks(self, q: torch.Tensor, cache: LayerCache, group: DecodeGroup) -> BlockSelection | None: ...

    def observe_decode(self, cache: LayerCache, head: int, slots: torch.Tensor, probs: torch.Tensor) -> None: ...

    def read_values(self, probs: torch.Tensor, cache: LayerCache, slots: torch.Tensor, context_lens: torch.Tensor) -> torch.Tensor: ...


def group_by_length(num_blocks: list[int], slack_blocks: int = 4, ratio: float = 1.5) -> list[int]:
    """Split lengths sorted ascending into runs whose longest is within ``ratio`` x (or ``slack_blocks``) of their shortest.

    Returns run sizes. Bounds padding in the decode gather to a small factor of the real work.
    """
    sizes: list[int] = []
    first = None
    for n in num_blocks:
        if first is None or (n > first * ratio and n > first + slack_blocks):
            sizes.append(0)
            first = n
        sizes[-1] += 1
    return sizes
