"""Turns a scheduled step into tensors, runs the model once, and returns only the logits needed."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kvtier.attention.metadata import AttentionMetadata, DecodeGroup, PrefillSpan, group_by_length
from kvtier.cache.kv_cache_manager import KVCacheManager
from kvtier.cache.kv_storage import KVStorage
from kvtier.engine.scheduler import Chunk


@dataclass
class StepLogits:
    last: dict[int, torch.Tensor]  # seq_id -> [V] logits after the chunk's last token (sampled seqs only)
    prompt: dict[int, torch.Tensor]  # seq_id -> [num_tokens, V] logits at every chunk position (prompt_logprobs)


class ModelRunner:
    def __init__(self, model: nn.Module, storage: KVStorage, kv: KVCacheManager, device: torch.device) -> None:
        self.model = model
        self.storage = storage
        self.kv = kv
        self.device = device
        self.block_size = kv.block_size
        self.kv_caches = storage.layer_caches()

    def _slots(self, seq_id: int, start: int, n: int) -> torch.Tensor:
        table = torch.tensor(self.kv.block_ids(seq_id), dtype=torch.long)
        pos = torch.arange(start, start + n)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    @torch.inference_mode()
    def execute(self, chunks: list[Chunk], sample_ids: set[int], prompt_logit_ids: set[int]) -> StepLogits:
        decodes = sorted((c for c in chunks if c.num_tokens == 1), key=lambda c: len(self.kv.tables[c.seq.seq_id]))
        prefills = [c for c in chunks if c.num_tokens > 1]
        ids: list[int] = []
        positions: list[int] = []
        slot_parts: list[torch.Tensor] = []
        groups = self._decode_groups(decodes, ids, positions, slot_parts)
        spans: list[PrefillSpan] = []
        dev = self.device
        for c in prefills:
            start = len(ids)
            ids.extend(c.seq.token_ids[c.start : c.start + c.num_tokens])
            positions.extend(range(c.start, c.start + c.num_tokens))
            slot_parts.append(self._slots(c.seq.seq_id, c.start, c.num_tokens))
            ctx = c.start + c.num_tokens
            gather = None if c.start == 0 else self._slots(c.seq.seq_id, 0, ctx).to(dev)
            spans.append(PrefillSpan(start, c.num_tokens, ctx, gather, torch.arange(c.start, ctx, device=dev)))
        meta = AttentionMetadata(torch.cat(slot_parts).to(dev), len(decodes), groups, spans)
        hidden = self.model(torch.tensor(ids, device=dev), torch.tensor(positions, device=dev), self.kv_caches, meta)
        return self._logits(decodes + prefills, hidden, sample_ids, prompt_logit_ids)

    def _decode_groups(self, decodes: list[Chunk], ids: list[int], positions: list[int], slot_parts: list[torch.Tensor]) -> list[DecodeGroup]:
        """Decode tokens go first, sorted by block count and split into groups of similar length."""
        if not decodes:
            return []
        bs = self.block_size
        tables = [self.kv.block_ids(c.seq.seq_id) for c in decodes]
        pos = torch.tensor([c.start for c in decodes], dtype=torch.long)
        ids.extend(c.seq.token_ids[c.start] for c in decodes)
        positions.extend(pos.tolist())
        last_block = torch.tensor([t[p // bs] for t, p in zip(tables, pos.tolist())], dtype=torch.long)
        slot_parts.append(last_block * bs + pos % bs)
        groups, start = [], 0
        for size in group_by_length([len(t) for t in tables]):
            rows = tables[start : start + size]
            width = len(rows[-1])
            flat = torch.tensor([b for t in rows for b in t + [0] * (width - len(t))], dtype=torch.long, device=self.device)
            p = pos[start : start + size].to(self.device)
            groups.append(DecodeGroup(start, flat, p + 1, p, bs))
            start += size
        return groups

    def _logits(self, ordered: list[Chunk], hidden: torch.Tensor, sample_ids: set[int], prompt_logit_ids: set[int]) -> StepLogits:
        rows: list[int] = []
        owners: list[tuple[int, bool, int]] = []  # (seq_id, is_prompt_block, length)
        offset = 0
        for c in ordered:
            sid = c.seq.seq_id
            if sid in prompt_logit_ids:
                rows.extend(range(offset, offset + c.num_tokens))
                owners.append((sid, True, c.num_tokens))
            elif sid in sample_ids:
                rows.append(offset + c.num_tokens - 1)
                owners.append((sid, False, 1))
            offset += c.num_tokens
        result = StepLogits({}, {})
        if not rows:
            return result
        logits = self.model.compute_logits(hidden[torch.tensor(rows, device=hidden.device)]).float()
        i = 0
        for sid, is_prompt, n in owners:
            block = logits[i : i + n]
            if is_prompt:
                result.prompt[sid] = block
            if sid in sample_ids:
                result.last[sid] = block[-1]
            i += n
        return result
