"""Where the engine lets a KV method act on a sequence's cache.

A method that evicts does so once the prompt is in the cache: the prefill stops at the prompt's end (a recomputed
sequence's too, so it is compressed again to the same kept set), the method chooses the kept positions, and the
coordinator compacts them into fresh blocks. This runs after the chunk that completes the prompt and before the
first sample forks the sequence, so ``n > 1`` samples and beams share the compressed blocks. When the pool cannot
yet give the blocks the kept tokens need, the compaction waits for a later step, keeping every token decoded
meanwhile as well.
"""

from __future__ import annotations

import dataclasses

import torch

from kvtier.cache.coordinator import KVCacheCoordinator
from kvtier.cache.ops import token_slots
from kvtier.engine.scheduler import Chunk
from kvtier.engine.sequence import Sequence
from kvtier.kv_methods.base import KVMethod, PromptCache


class Compression:
    def __init__(self, method: KVMethod | None, kv: KVCacheCoordinator, num_layers: int, num_kv_heads: int,
                 caches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """``caches``: each layer's (K, V) cache tensors, [kv_heads, slots, head_dim], which a method's ``keys`` reads."""
        self.method = method
        self.kv = kv
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.caches = caches
        self.window_rows: dict[int, list[list[torch.Tensor]]] = {}  # seq_id -> per chunk, per layer, the window's queries
        self.pending: dict[int, tuple[Sequence, torch.Tensor]] = {}  # seq_id -> (sequence, kept prompt positions)

    def describe(self) -> dict:
        """The method's name and config, as ``kvtier info`` shows them ("none": the full cache)."""
        return {"name": "none"} if self.method is None else {"name": self.method.name, **dataclasses.asdict(self.method.config)}

    def attach(self, seq: Sequence) -> None:
        if self.method is not None:
            seq.compress_at = seq.prompt_len
            seq.compute_from = max(0, seq.prompt_len - self.method.window)  # a prefix hit must leave the window's queries to compute

    def query_rows(self, chunks: list[Chunk]) -> dict[int, tuple[int, int]]:
        """Where this step's chunks cross their prompt's last ``window`` tokens: seq_id -> (first token of the chunk, count),
        the queries the method will read."""
        rows: dict[int, tuple[int, int]] = {}
        for c in chunks if self.method is not None and self.method.window else ():
            seq = c.seq
            if seq.compress_at is None or seq.num_evicted:
                continue
            first = max(0, seq.compress_at - self.method.window)
            lo, hi = max(c.start, first), min(c.start + c.num_tokens, seq.compress_at)
            if lo < hi:
                if lo == first:
                    self.window_rows[seq.seq_id] = []  # the window starts (again, when a preempted sequence is recomputed)
                rows[seq.seq_id] = (lo - c.start, hi - lo)
        return rows

    def after_chunk(self, seq: Sequence, queries: list[torch.Tensor] | None) -> None:
        """Keep the window's queries the chunk computed; compress when the chunk completed the prompt (first time, or
        recomputed after preemption)."""
        if queries is not None:
            self.window_rows[seq.seq_id].append(queries)
        if seq.compress_at is None or seq.num_computed_tokens != seq.compress_at or seq.num_evicted:
            return
        held = self.window_rows.pop(seq.seq_id, [])
        prompt = PromptCache(seq.prompt_len, self.num_layers, self.num_kv_heads, lambda layer: self._keys(seq.seq_id, layer, seq.prompt_len),
                             lambda layer: torch.cat([chunk[layer] for chunk in held]))
        keep = self.method.after_prefill(prompt)
        if keep is not None:
            self.pending[seq.seq_id] = (seq, keep)
            self._compact(seq.seq_id)

    def _keys(self, seq_id: int, layer: int, n: int) -> torch.Tensor:
        """The sequence's first ``n`` keys in ``layer``, [kv_heads, n, head_dim] (a method reads them before compaction)."""
        table = torch.tensor(self.kv.block_ids(seq_id)[0], dtype=torch.long)
        k_cache = self.caches[layer][0]
        return k_cache[:, token_slots(table, torch.arange(n), self.kv.block_size).to(k_cache.device)]

    def retire(self, seq_ids: list[int]) -> None:
        """Forget what is held for sequences that ended (finished or aborted, perhaps mid-window)."""
        for sid in seq_ids:
            self.window_rows.pop(sid, None)
            self.pending.pop(sid, None)

    def retry(self) -> None:
        """Compactions the pool could not take earlier, for sequences still in the device cache."""
        for seq_id, (seq, _) in list(self.pending.items()):
            if seq.finished or seq.num_evicted or seq.num_computed_tokens < seq.prompt_len:
                del self.pending[seq_id]  # gone, or preempted by recompute (compressed again at the prompt's end)
            elif self.kv.has(seq_id):
                self._compact(seq_id)

    def _compact(self, seq_id: int) -> None:
        seq, keep = self.pending[seq_id]
        later = torch.arange(seq.prompt_len, seq.num_computed_tokens)  # tokens computed since the prompt's end, all kept
        keep = torch.cat([keep, later.expand(*keep.shape[:2], -1)], dim=-1)
        if self.kv.compact(seq_id, keep):
            seq.num_evicted = seq.num_computed_tokens - keep.shape[-1]
            del self.pending[seq_id]
