"""Quest (Tang et al., ICML 2024): query-aware selection of the cache blocks each decode step reads; nothing is evicted.

Each block keeps the elementwise min and max of its keys. Before a decode step's attention, a query scores every block
by the largest dot product any key inside those bounds could give it, sum over d of max(q_d min_d, q_d max_d), and
attention reads only the best blocks: enough to hold ``budget`` tokens (a fraction of the context or a token count),
the block being written always among them. Quest's pages are the engine's blocks. Under grouped-query attention one
selection serves a KV head, scored by the highest bound among the query heads that share it (a block matters if any
of them would attend to it). The paper leaves its first two layers dense; here ``dense_layers`` says how many (0 by
default: every layer selects).
"""

from __future__ import annotations

import torch

from kvtier.attention.metadata import BlockSelection, DecodeGroup
from kvtier.cache.layer_cache import LayerCache
from kvtier.cache.ops import block_slots
from kvtier.cache.specs import blocks_needed
from kvtier.kv_methods.base import DenseLayersConfig, KVMethod


class Quest(KVMethod):
    name = "quest"
    config_class = DenseLayersConfig
    block_summary = True
    decode_hooks = True
    config: DenseLayersConfig

    def layers(self, num_layers: int) -> range:
        return self.config.method_layers(num_layers)

    def _blocks(self, context: int, block_size: int) -> int:
        """Blocks read by a query with ``context`` tokens before it (its own included)."""
        return blocks_needed(self.config.kept(context), block_size)

    def select_blocks(self, q: torch.Tensor, cache: LayerCache, group: DecodeGroup) -> BlockSelection | None:
        bs, rows = group.block_size, group.size
        table = group.block_ids.view(rows, -1)  # [rows, W], padded with block 0
        width = table.shape[1]
        contexts = group.context_lens.tolist()
        have = torch.tensor([blocks_needed(c, bs) for c in contexts], device=q.device)
        want = torch.minimum(torch.tensor([self._blocks(c, bs) for c in contexts], device=q.device), have)
        if bool((want == have).all()):
            return None
        kv_heads, _, dim = cache.k.shape
        bounds = cache.block_summary[:, table].float()  # [Hkv, rows, W, 2, D]
        qd = q.float().view(rows, kv_heads, -1, dim).transpose(0, 1)  # [Hkv, rows, g, D]
        # sum_d max(q_d min_d, q_d max_d): the positive part of q meets the max, the negative part the min
        upper = (qd.clamp(min=0) @ bounds[..., 1, :].transpose(-1, -2) + qd.clamp(max=0) @ bounds[..., 0, :].transpose(-1, -2)).amax(2)
        index = torch.arange(width, device=q.device)
        upper = upper.masked_fill(index >= have[:, None], float("-inf"))
        upper = upper.masked_fill(index == (have - 1)[:, None], float("inf"))  # the block being written
        chosen = upper.topk(int(want.max()), dim=-1).indices  # [Hkv, rows, k], best first
        ids = table.expand(kv_heads, -1, -1).gather(2, chosen)
        positions = block_slots(chosen, bs)  # [Hkv, rows, k * bs]: a chosen block's index in the row's table is its keys' positions
        ranked = (torch.arange(chosen.shape[-1], device=q.device)[None, :] < want[:, None]).repeat_interleave(bs, dim=-1)
        visible = (positions < group.context_lens[None, :, None]) & ranked[None]
        return BlockSelection(ids.flatten(1), visible[:, :, None, :])

    def rows_read(self, num_slots: int, num_tokens: int, block_size: int, group_size: int) -> tuple[int, int]:
        blocks = blocks_needed(num_slots, block_size)
        chosen = min(blocks, self._blocks(num_slots, block_size)) * block_size
        return chosen + 2 * blocks, chosen  # each block's min and max are a K row each
