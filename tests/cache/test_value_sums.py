"""The per-block V sums KCache's residual keeps beside K: after any sequence of appends, chunked writes, block reuse
and compaction, each block's sum equals the sum of the values its tokens hold (computed from V directly)."""

from __future__ import annotations

import torch

from kvtier.attention.paged import write_kv
from kvtier.cache.kv_storage import AttentionStorage
from kvtier.cache.layer_cache import add_value_sums
from kvtier.cache.memory_plan import GroupPlan
from kvtier.cache.ops import Compaction
from kvtier.cache.specs import HostValueSpec, KVCacheGroup

BS, HEADS, DIM, BLOCKS = 4, 2, 3, 6


def storage() -> AttentionStorage:
    spec = HostValueSpec(BS, HEADS, DIM, torch.float32, value_sums=True, kv_method=True)
    return AttentionStorage(GroupPlan(KVCacheGroup(spec, (0,)), 0, BLOCKS, 2), BS, torch.device("cpu"))


def expected(v: torch.Tensor, filled: dict[int, int]) -> dict[int, torch.Tensor]:
    """Each block's sum over its first ``filled[block]`` slots, from V itself."""
    return {b: v[:, b * BS:b * BS + n].sum(1) for b, n in filled.items()}


def write(s: AttentionStorage, slots: list[int], g: torch.Generator) -> None:
    """Write new values at ``slots`` as the attention backend does (V into its tier, the sums beside K)."""
    layer = s.layer_caches()[0]
    idx = torch.tensor(slots)
    k, v = torch.randn(len(slots), HEADS, DIM, generator=g), torch.randn(len(slots), HEADS, DIM, generator=g)
    write_kv(layer.k, layer.v, k, v, idx)
    add_value_sums(layer.value_sums, v.transpose(0, 1), idx, BS)


def test_sums_follow_writes_reuse_and_compaction():
    g = torch.Generator().manual_seed(0)
    s = storage()
    layer = s.layer_caches()[0]
    write(s, [0, 1, 2, 3, 4, 5], g)  # a prefill chunk: block 0 whole, block 1 half
    write(s, [6], g)  # a decode append
    write(s, [7, 8, 9], g)  # the next chunk crosses into block 2
    filled = {0: 4, 1: 4, 2: 2}
    for b, want in expected(layer.v, filled).items():
        torch.testing.assert_close(layer.value_sums[:, b], want)
    write(s, [4, 5], g)  # block 1 freed and reused by another sequence: written from its first slot, it starts afresh
    filled[1] = 2
    for b, want in expected(layer.v, filled).items():
        torch.testing.assert_close(layer.value_sums[:, b], want)
    # an evicting method keeps slots 1, 3 and 8 of each head, compacted into block 3 from its first slot
    s.compact(Compaction(torch.tensor([[[1, 3, 8], [0, 2, 9]]]), torch.tensor([12, 13, 14])))
    torch.testing.assert_close(layer.value_sums[:, 3], layer.v[:, 12:15].sum(1))
