"""One attention layer's cache tensors, as the attention backend and a KV method see them."""

from __future__ import annotations

from typing import NamedTuple

import torch


class LayerCache(NamedTuple):
    """K and V [kv_heads, slots, head_dim], and what the engine's KV method keeps beside them: ``slot_stats``
    [kv_heads, slots] fp32 (one number per token, H2O's accumulated attention) and ``block_summary``
    [kv_heads, blocks, 2, head_dim] (each block's elementwise min and max of its keys, Quest's) and ``value_sums``
    [kv_heads, blocks, head_dim] (each block's sum of its values, beside K wherever V lives: KCache's residual). All move
    with their tokens' K and V (copy-on-write, swap, compaction). ``index``: the layer's place among its group's layers, the
    numbering of a KV method's ``PromptCache`` and ``DecodeCache``."""

    k: torch.Tensor
    v: torch.Tensor
    slot_stats: torch.Tensor | None = None
    block_summary: torch.Tensor | None = None
    value_sums: torch.Tensor | None = None
    index: int = 0


def summarize_blocks(k: torch.Tensor, summary: torch.Tensor, slots: torch.Tensor) -> None:
    """Recompute the min and max of the keys of every block that ``slots`` [n] just wrote. A block fills in slot order
    (appends and compactions both write it from its first slot), so its keys are its slots up to the last one written."""
    block_size = k.shape[1] // summary.shape[1]
    blocks, offsets = slots // block_size, slots % block_size
    touched, inverse = blocks.unique(return_inverse=True)
    filled = torch.zeros_like(touched).scatter_reduce_(0, inverse, offsets, "amax")  # last written offset per block
    rows = k.view(k.shape[0], -1, block_size, k.shape[-1])[:, touched]  # [kv_heads, touched, block_size, head_dim]
    valid = (torch.arange(block_size, device=k.device)[None, :] <= filled[:, None])[None, :, :, None]
    summary[:, touched, 0] = rows.masked_fill(~valid, float("inf")).amin(2)
    summary[:, touched, 1] = rows.masked_fill(~valid, float("-inf")).amax(2)


def add_value_sums(sums: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, block_size: int) -> None:
    """Add the values [kv_heads, n, head_dim] just written at ``slots`` [n] to their blocks' sums. A block fills in slot
    order from its first slot (appends, recomputes and compactions alike), so writing that slot starts the block afresh."""
    blocks = slots // block_size
    sums[:, blocks[slots % block_size == 0]] = 0
    sums.index_add_(1, blocks, v.to(sums.dtype))
