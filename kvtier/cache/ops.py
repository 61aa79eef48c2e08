"""Physical block moves (copy-on-write, swap out, swap in) as plain data, decided by the cache managers and done by the worker."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

MoveKind = Literal["copy", "swap_out", "swap_in"]  # device -> device (copy-on-write), device -> host, host -> device


@dataclass
class CacheOps:
    """Physical block moves the worker must do before the next forward, in the order they were decided.

    The order matters: a block given up by one move (a sequence swapped out, a copy-on-write source)
    may be the destination of a later one in the same step, so the worker replays them in order.
    """

    moves: list[tuple[MoveKind, int, int]] = field(default_factory=list)

    def add(self, kind: MoveKind, src: int, dst: int) -> None:
        self.moves.append((kind, src, dst))

    def __bool__(self) -> bool:
        return bool(self.moves)

    def runs(self) -> Iterator[tuple[MoveKind, list[tuple[int, int]]]]:
        """The moves as batches the worker can do at once: consecutive moves of one kind, cut where a move
        reads or writes a block that an earlier move of the batch writes (a batch reads everything first)."""
        kind: MoveKind | None = None
        pairs: list[tuple[int, int]] = []
        written: set[int] = set()
        for k, src, dst in self.moves:
            if k != kind or src in written or dst in written:
                if pairs:
                    yield kind, pairs
                kind, pairs, written = k, [], set()
            pairs.append((src, dst))
            written.add(dst)
        if pairs:
            yield kind, pairs
