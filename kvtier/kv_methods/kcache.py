"""KCache (He & Wu, 2024): K where attention runs, V in host memory, and only the Top-N V rows read at each decode step.

Every decode query scores all its keys exactly (q.K^T and the softmax over the whole context, K being in the device
pool), keeps the N highest probabilities of each head and reads only those N rows of V, one batched gather from the
host tier, for the weighted sum. Prefill is exact: its queries read V whole. Nothing is evicted, so a larger N or a
later question can always recover what a smaller N missed; what KCache saves is device memory (V's half of every
token, ``HostValueSpec``) and V traffic per step. Beside a GPU, V sits in pinned host memory and the chosen rows are
read in place over the bus by a GPU gather (``kvtier.cache.host_view``).

The paper's body could not be read (../shared/methods/kcache.md), so its open choices are config keys: ``top_n`` (a
count, or a fraction of the context; ``budget``, every method's key, is its alias), ``dense_layers`` (the first L
layers keep V beside K and read it whole, as Quest's evaluation keeps its first two), ``renormalize`` (the Top-N
probabilities rescaled to sum to 1, as Quest's attention over its chosen pages does; else the missing mass is
dropped) and ``per_kv_head`` (under grouped-query attention one Top-N per KV head, scored by the highest probability
among the query heads that share it, as ShadowKV chooses; else one per query head).

``residual`` is kvtier's addition, not the paper's: the softmax is over every key, so the probability mass of the rows
not read is known exactly, block by block. Each block's V sum is kept beside K (one row per block, updated as tokens
are written: ``LayerCache.value_sums``), and the missing mass of each block goes to its mean value instead of being
dropped or rescaled away. It reads no more of the host tier, and costs a device row per block (1/16 of V at the
default block size): an estimate of the tail that diffuse heads lose most to.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvtier.attention.metadata import ValueSelection
from kvtier.cache.host_view import device_view
from kvtier.cache.layer_cache import LayerCache
from kvtier.cache.specs import blocks_needed
from kvtier.errors import InvalidArgumentError
from kvtier.kv_methods.base import DenseLayersConfig, KVMethod, KVMethodConfig


@dataclass(frozen=True)
class KCacheConfig(DenseLayersConfig):
    """``top_n``: V rows each head reads per decode step, a whole number >= 1 or a fraction of the context in (0, 1]
    (None: ``budget``, its alias). ``renormalize`` (None: true unless ``residual``) cannot be true with ``residual``: the
    missing mass is then estimated, not rescaled away."""

    top_n: float | int | None = None
    renormalize: bool | None = None
    per_kv_head: bool = False
    residual: bool = False

    def __post_init__(self) -> None:
        if self.top_n is not None:
            if self.budget not in (1.0, self.top_n):
                raise InvalidArgumentError("kv_method_config.top_n",
                                           f"is budget's alias: give one of them, got top_n {self.top_n!r} and budget {self.budget!r}")
            try:
                KVMethodConfig(self.top_n)
            except InvalidArgumentError as e:
                raise InvalidArgumentError("kv_method_config.top_n", e.message) from None
            object.__setattr__(self, "budget", self.top_n)
        super().__post_init__()
        if self.renormalize is None:
            object.__setattr__(self, "renormalize", not self.residual)
        for name in ("renormalize", "per_kv_head", "residual"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidArgumentError(f"kv_method_config.{name}", f"must be true or false, got {getattr(self, name)!r}")
        if self.renormalize and self.residual:
            raise InvalidArgumentError("kv_method_config.renormalize",
                                       "must be false with residual: the mass of the rows not read is estimated, not rescaled away")


class KCache(KVMethod):
    name = "kcache"
    config_class = KCacheConfig
    host_values = True
    decode_hooks = True
    reads_values = True
    config: KCacheConfig

    def __init__(self, config: KCacheConfig) -> None:
        super().__init__(config)
        self.value_selection = ValueSelection(config.budget, config.per_kv_head, config.renormalize, config.residual)
        self.value_sums = config.residual
        self._host_views: dict[int, torch.Tensor] = {}  # a GPU view of each pinned V pool, by address

    def layers(self, num_layers: int) -> range:
        return self.config.method_layers(num_layers)

    def read_values(self, probs: torch.Tensor, cache: LayerCache, slots: torch.Tensor, context_lens: torch.Tensor) -> torch.Tensor:
        rows, kv_heads, group, width = probs.shape
        values = cache.v
        flat = values.view(-1, values.shape[-1])  # [kv_heads * slots, D]: one gather serves every head
        base = torch.arange(kv_heads, device=slots.device)[:, None, None] * values.shape[1]
        counts = self.value_selection.counts(context_lens)
        rest = None
        if bool((counts >= context_lens).all()):  # N covers every key: read V whole
            picked = slots[:, None, None, :] + base  # [rows, kv_heads, 1, width]
            p = probs
        else:
            n = int(counts.max())
            score = probs.amax(2, keepdim=True) if self.config.per_kv_head else probs  # [rows, kv_heads, 1 or group, width]
            top = score.topk(n, dim=-1).indices.expand(rows, kv_heads, group, n)  # best first: a smaller count keeps its first ranks
            picked = slots.gather(1, top[:, :, :score.shape[2]].flatten(1)).view(rows, kv_heads, -1, n) + base
            p = probs.gather(-1, top).masked_fill(torch.arange(n, device=probs.device) >= counts[:, None, None, None], 0.0)
            if self.config.residual:
                rest = _residual(probs.scatter_add(-1, top, -p), cache.value_sums, slots, context_lens, values.shape[1] // cache.value_sums.shape[1])
            elif self.config.renormalize:
                p = p / p.sum(-1, keepdim=True)
        v = _gather_rows(flat, picked.flatten(), probs.device, self._host_views).view(*picked.shape, -1)  # from the host tier
        out = (p.unsqueeze(-2) @ v.float()).squeeze(-2)  # [rows, kv_heads, group, 1, n] @ [rows, kv_heads, 1 or group, n, D]
        return out if rest is None else out + rest

    def rows_read(self, num_slots: int, num_tokens: int, block_size: int, group_size: int) -> tuple[int, int]:
        kept = self.config.kept(num_slots)
        if kept >= num_slots:
            return num_slots, num_slots
        sums = blocks_needed(num_slots, block_size) if self.config.residual else 0  # a block's V sum is a row beside K
        return num_slots + sums, kept * (1 if self.config.per_kv_head else group_size)


def _residual(missing: torch.Tensor, sums: torch.Tensor, slots: torch.Tensor, context_lens: torch.Tensor, block_size: int) -> torch.Tensor:
    """The mass ``missing`` [rows, kv_heads, group, keys] of the keys not read, each block's share times its mean value
    (its V sum in ``sums`` [kv_heads, blocks, D] over its tokens): [rows, kv_heads, group, D]. ``slots`` [rows, keys] run
    block by block through each row's table."""
    rows, kv_heads, group, width = missing.shape
    blocks = width // block_size
    mass = missing.view(rows, kv_heads, group, blocks, block_size).sum(-1)
    tokens = (context_lens[:, None] - torch.arange(blocks, device=slots.device) * block_size).clamp(1, block_size)  # [rows, blocks]
    means = sums[:, slots[:, ::block_size] // block_size].float() / tokens.to(sums.device)[None, :, :, None]  # [kv_heads, rows, blocks, D]
    return mass @ means.transpose(0, 1)


def _gather_rows(flat: torch.Tensor, index: torch.Tensor, device: torch.device, views: dict[int, torch.Tensor]) -> torch.Tensor:
    """``flat[index]`` on ``device``. V in pinned host memory beside a GPU: a GPU gather through a device view of the pool
    (zero-copy, ``kvtier.cache.host_view``; one view per pool, kept in ``views``), reading only the chosen rows over the
    bus."""
    if device.type == "cuda" and flat.device.type == "cpu" and flat.is_pinned():
        view = views.get(flat.data_ptr())
        if view is None:
            view = views[flat.data_ptr()] = device_view(flat, device)
        return view.index_select(0, index.to(device))
    return flat.index_select(0, index.to(flat.device)).to(device)
