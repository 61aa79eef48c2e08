"""Physical cache work as plain data, decided by the cache managers and done by the worker: block moves (copy-on-write,
swap out, swap in) and compactions (a KV method's kept tokens gathered into fewer blocks)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch

MoveKind = Literal["copy", "swap_out", "swap_in"]  # device -> device (copy-on-write), device -> host, host -> device


def token_slots(block_ids: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """The flat cache slot of each token position, through a table of block ids (any shape of positions)."""
    return block_ids[positions // block_size] * block_size + positions % block_size


def block_slots(block_ids: torch.Tensor, block_size: int) -> torch.Tensor:
    """Every slot of each block, in order: [..., n] block ids -> [..., n * block_size] slots."""
    slots = block_ids[..., None] * block_size + torch.arange(block_size, device=block_ids.device)
    return slots.flatten(-2)


@dataclass(frozen=True)
class Compaction:
    """Slot ``src[l, h, i]`` of layer l (of the group) and KV head h moves to slot ``dst[i]``; every source is read
    before any destination is written."""

    src: torch.Tensor  # [layers, kv_heads, n] long
    dst: torch.Tensor  # [n] long


@dataclass
class CacheOps:
    """Physical block moves the worker must do before the next forward, in the order they were decided.

    The order matters: a block given up by one move (a sequence swapped out, a copy-on-write source)
    may be the destination of a later one in the same step, so the worker replays them in order.
    """

    moves: list[tuple[MoveKind, int, int] | Compaction] = field(default_factory=list)

    def add(self, kind: MoveKind, src: int, dst: int) -> None:
        self.moves.append((kind, src, dst))

    def compact(self, compaction: Compaction) -> None:
        self.moves.append(compaction)

    def __bool__(self) -> bool:
        return bool(self.moves)

    def runs(self) -> Iterator[tuple[MoveKind, list[tuple[int, int]]] | Compaction]:
        """The work as batches the worker can do at once: consecutive moves of one kind, cut where a move
        reads or writes a block that an earlier move of the batch writes (a batch reads everything first);
        a compaction on its own."""
        kind: MoveKind | None = None
        pairs: list[tuple[int, int]] = []
        written: set[int] = set()
        for move in self.moves:
            if isinstance(move, Compaction):
                if pairs:
                    yield kind, pairs
                kind, pairs, written = None, [], set()
                yield move
                continue
            k, src, dst = move
            if k != kind or src in written or dst in written:
                if pairs:
                    yield kind, pairs
                kind, pairs, written = k, [], set()
            pairs.append((src, dst))
            written.add(dst)
        if pairs:
            yield kind, pairs
