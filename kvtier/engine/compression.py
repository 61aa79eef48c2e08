"""Where the engine lets a KV method act on a sequence's cache.

A method that evicts does so once the prompt is in the cache: the prefill stops at the prompt's end (a recomputed
sequence's too, so it is compressed again to the same kept set), the method chooses the kept positions, and the
coordinator compacts them into fresh blocks. This runs after the chunk that completes the prompt and before the
first sample forks the sequence, so ``n > 1`` samples and beams share the compressed blocks. When the pool cannot
yet give the blocks the kept tokens need, the compaction waits for a later step, keeping every token decoded
meanwhile as well. A method that evicts as the cache grows (H2O) is asked again after each decoded token; its choice
is compacted the same way, or dropped when the pool is short (it will choose again).
"""

from __future__ import annotations

import dataclasses

import torch

from kvtier.cache.coordinator import KVCacheCoordinator
from kvtier.cache.layer_cache import LayerCache
from kvtier.cache.ops import token_slots
from kvtier.engine.scheduler import Chunk
from kvtier.engine.sequence import Sequence
from kvtier.kv_methods.base import DecodeCache, KVMethod, PromptCache


class Compression:
    def __init__(self, method: KVMethod | None, kv: KVCacheCoordinator, num_layers: int, num_kv_heads: int, caches: list[LayerCache]) -> None:
        """``caches``: each layer's cache tensors, which a method reads (keys, per-slot stats) through this."""
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
        recomputed after preemption), or when the method evicts as the cache grows."""
        if queries is not None:
            self.window_rows[seq.seq_id].append(queries)
        if seq.compress_at is None or seq.seq_id in self.pending:
            return
        if seq.num_computed_tokens > seq.compress_at:
            self._after_decode(seq)
            return
        if seq.num_computed_tokens != seq.compress_at or seq.num_evicted:
            return
        held = self.window_rows.pop(seq.seq_id, [])
        prompt = PromptCache(seq.prompt_len, self.num_layers, self.num_kv_heads, lambda layer: self._keys(seq.seq_id, layer, seq.prompt_len),
                             lambda layer: torch.cat([chunk[layer] for chunk in held]),
                             lambda layer, values: self._write_stats(seq.seq_id, layer, values))
        keep = self.method.after_prefill(prompt)
        if keep is not None:
            self.pending[seq.seq_id] = (seq, keep)
            self._compact(seq.seq_id)

    def _after_decode(self, seq: Sequence) -> None:
        view = DecodeCache(seq.num_computed_tokens, seq.num_cached_slots, self.num_layers, self.num_kv_heads, self.kv.block_size,
                           lambda layer: self._slot_stats(seq.seq_id, layer, seq.num_cached_slots),
                           lambda layer: slot_positions(seq, self.num_layers, self.num_kv_heads)[layer])
        keep = self.method.after_decode(view)
        if keep is not None and self.kv.compact(seq.seq_id, keep):
            self._evicted(seq, keep)

    def _table_slots(self, seq_id: int, n: int) -> torch.Tensor:
        """The cache slots of the sequence's first ``n`` slots in its table."""
        table = torch.tensor(self.kv.block_ids(seq_id)[0], dtype=torch.long)
        return token_slots(table, torch.arange(n), self.kv.block_size)

    def _keys(self, seq_id: int, layer: int, n: int) -> torch.Tensor:
        """The sequence's first ``n`` keys in ``layer``, [kv_heads, n, head_dim] (a method reads them before compaction)."""
        k_cache = self.caches[layer].k
        return k_cache[:, self._table_slots(seq_id, n).to(k_cache.device)]

    def _slot_stats(self, seq_id: int, layer: int, n: int) -> torch.Tensor:
        stats = self.caches[layer].slot_stats
        return stats[:, self._table_slots(seq_id, n).to(stats.device)]

    def _write_stats(self, seq_id: int, layer: int, values: torch.Tensor) -> None:
        stats = self.caches[layer].slot_stats
        stats[:, self._table_slots(seq_id, values.shape[-1]).to(stats.device)] = values.to(stats.device, torch.float32)

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
            self._evicted(seq, keep)
            del self.pending[seq_id]

    def _evicted(self, seq: Sequence, keep: torch.Tensor) -> None:
        """Note a compaction to the cache slots ``keep`` [layers, kv_heads, kept]: the tokens gone, and the position each
        kept slot holds."""
        seq.slot_positions = keep if seq.slot_positions is None else slot_positions(seq, self.num_layers, self.num_kv_heads).gather(-1, keep)
        seq.num_evicted = seq.num_computed_tokens - keep.shape[-1]


def slot_positions(seq: Sequence, num_layers: int, num_kv_heads: int) -> torch.Tensor:
    """[layers, kv_heads, cached slots] the position of the token in each of the sequence's cache slots: the map of its last
    compaction, then one slot per later token (all of them before any compaction)."""
    old = seq.slot_positions
    done = 0 if old is None else old.shape[-1]
    later = (torch.arange(done, seq.num_cached_slots) + seq.num_evicted).expand(num_layers, num_kv_heads, -1)
    return later if old is None else torch.cat([old, later], dim=-1)
