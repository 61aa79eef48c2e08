"""One group's block tables for sliding-window layers: blocks behind the window go back to the pool.

A query at position p sees keys p - window + 1 .. p (HF's Mistral mask). Once a sequence has computed
``c`` tokens, its next query is at ``c``, so a block whose last slot is before ``c - window + 1`` is read
by no future query and is released while the sequence runs (it stays in the prefix cache until
evicted). Its table entry becomes None, so table indices stay token positions. A prefix hit needs only
the blocks the first uncomputed token's window reaches (after vLLM v1's SlidingWindowManager).
"""

from __future__ import annotations

from collections.abc import Sequence

from kvtier.cache.block_pool import KVBlock
from kvtier.cache.full_attention import FullAttentionManager
from kvtier.cache.specs import SlidingWindowSpec


class SlidingWindowManager(FullAttentionManager):
    spec: SlidingWindowSpec

    def _first_needed(self, num_computed: int) -> int:
        """Index of the first block a query at position ``num_computed`` or later can read."""
        return max(0, num_computed - self.spec.window + 1) // self.block_size

    def remove_skipped(self, seq_id: int, num_computed: int) -> None:
        table = self.tables.get(seq_id)
        if not table:
            return
        i = min(self._first_needed(num_computed), len(table)) - 1
        while i >= 0 and table[i] is not None:  # the blocks before the last released one were released already
            self.pool.release(table[i])
            table[i] = None
            i -= 1

    def hit_length(self, known: Sequence[KVBlock | None], max_blocks: int) -> int:
        """The longest hit whose window is all cached: blocks before the window may be gone."""
        run = 0  # cached blocks ending at index i
        runs = []
        for block in known[:max_blocks]:
            run = run + 1 if block is not None else 0
            runs.append(run)
        for n in range(len(runs), 0, -1):
            if runs[n - 1] >= n - self._first_needed(n * self.block_size):
                return n
        return 0

    def hit_blocks(self, known: Sequence[KVBlock | None], num_blocks: int) -> list[KVBlock | None]:
        first = self._first_needed(num_blocks * self.block_size)
        return [None] * first + list(known[first:num_blocks])
