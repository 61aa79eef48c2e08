"""The default attention backend, ``paged``: the PagedAttention data path done with matmuls on gathered blocks.

Each layer's cache is K and V as [kv_heads, num_blocks * block_size, head_dim]; a sequence's keys
live in the blocks its block table names. Heads-outermost makes one head's cache a 2-D table of
whole blocks, so a decode gather is a row gather straight into the [batch, keys, head_dim]
layout a batched matmul wants. Decodes come in groups of similar length to bound padding.
Grouped-query attention needs no K/V repeat: the query heads that share a KV head are folded
into the query-length axis. This is the op a GPU kernel replaces.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from kvtier.attention.backend import AttentionBackend
from kvtier.attention.metadata import AttentionMetadata, DecodeGroup, DecodeHooks, PrefillSpan, ScheduledTokens, group_by_length
from kvtier.cache.layer_cache import LayerCache, add_value_sums, summarize_blocks
from kvtier.cache.ops import block_slots, token_slots


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """Store the new tokens' K/V [T, Hkv, D] at their slots (V in the host tier where it lives there)."""
    k_cache.index_copy_(1, slots, k.transpose(0, 1))
    v_cache.index_copy_(1, slots.to(v_cache.device), v.transpose(0, 1).to(v_cache.device))


def _gather(cache_head: torch.Tensor, block_ids: torch.Tensor, batch: int, block_size: int) -> torch.Tensor:
    """[batch, max_blocks * block_size, D] rows of one KV head: a 2-D row gather, the fastest on CPU."""
    slots, dim = cache_head.shape
    table = cache_head.view(slots // block_size, block_size * dim)
    return F.embedding(block_ids, table).view(batch, -1, dim)


def decode_attention(q: torch.Tensor, cache: LayerCache, group: DecodeGroup, scale: float, probs_out: list[torch.Tensor] | None = None,
                     hooks: DecodeHooks | None = None) -> torch.Tensor:
    """q [B, H, D] -> [B, H, D]: one query per sequence, one KV head at a time. With ``probs_out``, append the
    attention probabilities [B, H, L] (fp32, over ``group.key_positions()``). A KV method's ``hooks`` may choose the
    blocks each KV head reads and see the probabilities over the cache slots they came from."""
    batch, num_heads, dim = q.shape
    num_kv = cache.k.shape[0]
    per_kv = num_heads // num_kv
    qd = q.view(batch, num_kv, per_kv, dim)
    out = torch.empty_like(qd)
    chosen = None if hooks is None else hooks.select_blocks(q, cache, group)
    reads_values = hooks is not None and hooks.reads_values
    heads = []
    for h in range(num_kv):
        block_ids = group.block_ids if chosen is None else chosen.block_ids[h]
        keys = _gather(cache.k[h], block_ids, batch, group.block_size)
        scores = torch.bmm(qd[:, h], keys.transpose(1, 2)).mul_(scale)
        scores.masked_fill_(~(group.mask() if chosen is None else chosen.mask[h]), float("-inf"))
        probs = scores.softmax(-1, dtype=torch.float32)
        if not reads_values:
            torch.bmm(probs.to(q.dtype), _gather(cache.v[h], block_ids, batch, group.block_size), out=out[:, h])
        if hooks is not None and hooks.observes_decode:
            hooks.observe_decode(cache, h, block_slots(block_ids.view(batch, -1), group.block_size), probs)
        if probs_out is not None or reads_values:
            heads.append(probs)
    if reads_values:  # every KV head at once: one gather of V rows per layer
        slots = block_slots(group.block_ids.view(batch, -1), group.block_size)
        out.copy_(hooks.read_values(torch.stack(heads, 1), cache, slots, group.context_lens))
    if probs_out is not None:
        probs_out.append(torch.cat(heads, 1))
    return out.view(batch, num_heads, dim)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """One chunk's attention over its context: q [Lq, H, D], k/v [Hkv, L, D], mask [Lq, L] (None: causal, Lq = L) ->
    [Lq, H, D]. SDPA on 4-D views with ``enable_gqa`` (no K/V repeat) runs torch's blocked flash kernel on CPU: 0.16x to
    0.88x the time of an explicit matmul and masked softmax (benchmarks/prefill_attention.py), and it never holds the
    whole score matrix."""
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k[None], v[None], attn_mask=mask, is_causal=mask is None, scale=scale,
                                         enable_gqa=True)
    return out[0].transpose(0, 1)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerCache, meta: AttentionMetadata, scale: float,
                    decode: Callable[..., torch.Tensor] = decode_attention) -> torch.Tensor:
    """Write this step's K/V into the cache (and clear or update what a KV method keeps beside them), then attend.
    q [T, H, D], k/v [T, Hkv, D] -> [T, H, D]. ``decode``: what attends a decode group (``decode_attention``'s signature)."""
    write_kv(cache.k, cache.v, k, v, meta.slot_mapping)
    if cache.slot_stats is not None:
        cache.slot_stats[:, meta.slot_mapping] = 0.0  # a new token has received no attention yet
    if cache.block_summary is not None:
        summarize_blocks(cache.k, cache.block_summary, meta.slot_mapping)
    if cache.value_sums is not None:
        add_value_sums(cache.value_sums, v.transpose(0, 1), meta.slot_mapping, cache.k.shape[1] // cache.value_sums.shape[1])
    if meta.query_rows is not None:
        meta.queries.append(q.index_select(0, meta.query_rows))
    out = torch.empty_like(q)
    probs = None if meta.decode_probs is None else []
    for g in meta.decode_groups:
        rows = slice(g.start, g.start + g.size)
        out[rows] = decode(q[rows], cache, g, scale, probs, meta.kv_method)
    if probs is not None:
        meta.decode_probs.append(probs)
    for span in meta.prefills:
        rows = slice(span.start, span.start + span.query_len)
        if span.slots is None:
            kc, vc = k[rows].transpose(0, 1), v[rows].transpose(0, 1)
        else:
            kc, vc = cache.k.index_select(1, span.slots), cache.v.index_select(1, span.slots.to(cache.v.device)).to(q.device)
        out[rows] = prefill_attention(q[rows], kc, vc, span.mask(meta.window), scale)
    return out


def _slots(block_ids: list[int], start: int, n: int, block_size: int) -> torch.Tensor:
    return token_slots(torch.tensor(block_ids, dtype=torch.long), torch.arange(start, start + n), block_size)


def _first_block(start: int, window: int | None, block_size: int) -> int:
    """The first block a query at ``start`` (or later) reads."""
    return 0 if window is None else max(0, start - window + 1) // block_size


def _decode_groups(decodes: list[ScheduledTokens], group: int, window: int | None, block_size: int, device: torch.device,
                   by_length: bool) -> list[DecodeGroup]:
    """Decodes (sorted by length), each row's table cut to the blocks it reads; ``by_length``: split into groups of
    similar block count (padding costs a gather its whole width), else one group."""
    firsts = [_first_block(s.slot_start, window, block_size) for s in decodes]
    tables = [s.block_ids[group][first : s.slot_start // block_size + 1] for s, first in zip(decodes, firsts)]
    groups, start = [], 0
    for size in group_by_length([len(t) for t in tables]) if by_length else [len(tables)] if tables else []:
        rows = range(start, start + size)
        width = max(len(tables[i]) for i in rows)
        flat = torch.tensor([b for i in rows for b in tables[i] + [0] * (width - len(tables[i]))], dtype=torch.long, device=device)
        pos = torch.tensor([decodes[i].slot_start for i in rows], dtype=torch.long, device=device)
        key_starts = None if window is None else torch.tensor([firsts[i] * block_size for i in rows], dtype=torch.long, device=device)
        tokens = torch.tensor([decodes[i].start + 1 for i in rows], dtype=torch.long, device=device)
        groups.append(DecodeGroup(start, flat, pos + 1, pos, block_size, window, key_starts, tokens))
        start += size
    return groups


class PagedAttentionBackend(AttentionBackend):
    """Decodes first, shortest first and grouped by length; then each prefill chunk, attending over its gathered context."""

    name = "paged"
    decode_groups_by_length = True  # the gather reads every padded block: keep rows of similar length together

    def plan(self, seqs: list[ScheduledTokens], block_size: int, windows: dict[int, int | None],
             device: torch.device) -> tuple[list[ScheduledTokens], list[AttentionMetadata]]:
        decodes = sorted((s for s in seqs if s.num_tokens == 1), key=lambda s: s.slot_start)
        prefills = [s for s in seqs if s.num_tokens > 1]
        metas = [self._metadata(decodes, prefills, g, window, block_size, device, self.decode_groups_by_length) for g, window in windows.items()]
        return decodes + prefills, metas

    @staticmethod
    def _metadata(decodes: list[ScheduledTokens], prefills: list[ScheduledTokens], group: int, window: int | None, block_size: int,
                  device: torch.device, by_length: bool) -> AttentionMetadata:
        parts = [_slots(s.block_ids[group], s.slot_start, s.num_tokens, block_size) for s in prefills]
        if decodes:  # one vectorised op for all decodes, however many
            pos = torch.tensor([s.slot_start for s in decodes], dtype=torch.long)
            last = torch.tensor([s.block_ids[group][s.slot_start // block_size] for s in decodes], dtype=torch.long)
            parts.insert(0, last * block_size + pos % block_size)
        slots = torch.cat(parts).to(device)
        spans, offset = [], len(decodes)
        for s in prefills:
            ctx = s.slot_start + s.num_tokens
            key_start = _first_block(s.slot_start, window, block_size) * block_size if s.slot_start else 0
            gather = None if s.slot_start == 0 else _slots(s.block_ids[group], key_start, ctx - key_start, block_size).to(device)
            spans.append(PrefillSpan(offset, s.num_tokens, ctx, gather, torch.arange(s.slot_start, ctx, device=device), key_start))
            offset += s.num_tokens
        return AttentionMetadata(slots, len(decodes), _decode_groups(decodes, group, window, block_size, device, by_length), spans, window)

    def decode(self, q: torch.Tensor, cache: LayerCache, group: DecodeGroup, scale: float, probs_out: list[torch.Tensor] | None = None,
               hooks: DecodeHooks | None = None) -> torch.Tensor:
        """One decode group's attention (``decode_attention``); a faster backend overrides this alone."""
        return decode_attention(q, cache, group, scale, probs_out, hooks)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerCache, meta: AttentionMetadata,
                scale: float) -> torch.Tensor:
        return paged_attention(q, k, v, cache, meta, scale, self.decode)
