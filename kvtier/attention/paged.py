"""Attention over a paged KV cache (the PagedAttention data path, done with SDPA on gathered slots).

Each layer's cache is one tensor [num_blocks * block_size, kv_heads, head_dim]; a sequence's
keys live in the slots its block table names. Grouped-query attention is handled without
repeating K/V: the query heads that share a KV head are folded into the query-length axis.
This is the op a GPU kernel replaces; its signature is the whole interface.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvtier.attention.metadata import AttentionMetadata, prefill_mask


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """Store the new tokens' K/V [T, Hkv, D] at their slots."""
    k_cache.index_copy_(0, slots, k)
    v_cache.index_copy_(0, slots, v)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    window: int | None = None,
) -> torch.Tensor:
    """Write this step's K/V into the cache, then attend. q [T, H, D], k/v [T, Hkv, D] -> [T, H, D]."""
    write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
    num_tokens, num_heads, head_dim = q.shape
    num_kv = k.shape[1]
    group = num_heads // num_kv
    out = torch.empty_like(q)
    nd = meta.num_decode_tokens
    if nd:
        # [Bd, Hkv, group, D] queries against [Bd, Hkv, L, D] keys.
        qd = q[:nd].view(nd, num_kv, group, head_dim)
        kd = k_cache[meta.decode_slots].transpose(1, 2)
        vd = v_cache[meta.decode_slots].transpose(1, 2)
        od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=meta.decode_mask(window), scale=scale)
        out[:nd] = od.reshape(nd, num_heads, head_dim)
    for span in meta.prefills:
        rows = slice(span.start, span.start + span.query_len)
        if span.slots is None:
            kc, vc = k[rows], v[rows]
        else:
            kc, vc = k_cache[span.slots], v_cache[span.slots]
        # [Hkv, group * Lq, D] queries; the mask repeats for every head of the group.
        qp = q[rows].view(span.query_len, num_kv, group, head_dim).permute(1, 2, 0, 3)
        qp = qp.reshape(num_kv, group * span.query_len, head_dim)
        mask = prefill_mask(span, window).repeat(group, 1)
        op = F.scaled_dot_product_attention(qp, kc.transpose(0, 1), vc.transpose(0, 1), attn_mask=mask, scale=scale)
        out[rows] = op.view(num_kv, group, span.query_len, head_dim).permute(2, 0, 1, 3).reshape(span.query_len, num_heads, head_dim)
    return out
