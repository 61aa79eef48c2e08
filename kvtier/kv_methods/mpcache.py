"""MPCache (Zeng et al., NeurIPS 2025): look-once static eviction after prefill, then query-aware selection of clusters of
consecutive cached tokens at every decode step, designed to be cheap under secure multi-party computation.

Static: the prompt's last ``window_ratio`` queries (20%) look at the whole prompt once; a token's vote is the largest
attention any of them gives it, averaged over the heads; a layer keeps the best ``static_keep`` of the prompt (30%),
or every token whose vote reaches ``gamma``. One choice serves every head. Decoded tokens are never evicted.

Dynamic: the retained cache is cut into clusters of ``cluster_size1`` consecutive slots (32), each halved into
clusters of ``cluster_size2`` (16). A cluster is scored by one dot product with a representative key built from the
elementwise max and min of its keys, q . (alpha max + (1 - alpha) min) with alpha = 0.6: the paper's linearisation of
Quest's bound sum_d max(q_d max_d, q_d min_d), which under MPC needs a secret comparison per dimension and cluster
(``bound: "quest"`` scores by it instead). Level 1 keeps the best ``ratio1`` (half) of the large clusters; level 2
scores only their halves and keeps as many as hold the ``budget`` of the context. The first cluster (attention sinks)
and the last (the newest tokens) are always among them, counted inside the budget. Adjacent layers share one
selection, static and dynamic, from the third layer on (layers 2 and 3, 4 and 5, ...): their choices overlap by more
than 80% in the paper's measurements, so the second of a pair pays no selection.

The bounds are the engine's per-block key min and max (``block_summary``, kept up to date as tokens are written and
recomputed after compaction); a cluster merges the bounds of its blocks, so ``cluster_size2`` must be a multiple of
the block size. ``budget`` is what each decode step attends, as a fraction of the tokens so far or a count (0.06 is
the paper's 30% static keep x 20% ``ratio2``); the static eviction keeps at least that much. Under grouped-query
attention one selection serves a KV head, scored by the best of the query heads that share it (as Quest here).

Ablations: ``hierarchy: false`` (one level of ``cluster_size2`` clusters), ``share_layers: false``, ``granularity:
"token"`` (the best tokens by their exact q . k, as if clusters were one token).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvtier.attention.metadata import BlockSelection, DecodeGroup
from kvtier.cache.layer_cache import LayerCache
from kvtier.cache.ops import block_slots
from kvtier.errors import InvalidArgumentError
from kvtier.kv_methods.base import ALL_QUERIES, KVMethod, KVMethodConfig, PromptCache, prompt_attention

QUERY_CHUNK = 256  # window queries scored at once: bounds the [heads, chunk, tokens] probabilities held
SHARE_FROM = 2  # the first layer of the first shared pair (the paper's first two layers select on their own)
BOUNDS = ("linear", "quest")
GRANULARITIES = ("cluster", "token")


def _fraction(name: str, value: object, low_open: bool = True) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (0 < value <= 1 if low_open else 0 <= value <= 1)
    if not ok:
        raise InvalidArgumentError(f"kv_method_config.{name}", f"must be a number in {'(0, 1]' if low_open else '[0, 1]'}, got {value!r}")


@dataclass(frozen=True)
class MPCacheConfig(KVMethodConfig):
    """The paper's defaults. ``static_keep``: the fraction of the prompt the static eviction keeps (None: 0.3, unless
    ``gamma``, the attention threshold, is given instead)."""

    budget: float | int = 0.06
    static_keep: float | None = None
    gamma: float | None = None
    window_ratio: float = 0.2
    alpha: float = 0.6
    cluster_size1: int = 32
    cluster_size2: int = 16
    ratio1: float = 0.5
    hierarchy: bool = True
    share_layers: bool = True
    bound: str = "linear"
    granularity: str = "cluster"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.static_keep is not None and self.gamma is not None:
            raise InvalidArgumentError("kv_method_config.gamma", f"is the other static rule: give static_keep (a fixed ratio) or gamma (a "
                                       f"threshold), got static_keep {self.static_keep!r} and gamma {self.gamma!r}")
        if self.static_keep is not None:
            _fraction("static_keep", self.static_keep)
        if self.gamma is not None:
            _fraction("gamma", self.gamma)
        _fraction("window_ratio", self.window_ratio)
        _fraction("alpha", self.alpha, low_open=False)
        _fraction("ratio1", self.ratio1)
        for name in ("cluster_size1", "cluster_size2"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidArgumentError(f"kv_method_config.{name}", f"must be a whole number of tokens >= 1, got {value!r}")
        if self.cluster_size1 % self.cluster_size2:
            raise InvalidArgumentError("kv_method_config.cluster_size1", f"must be a multiple of cluster_size2 ({self.cluster_size2}): a level-1 "
                                       f"cluster is made of level-2 ones, got {self.cluster_size1}")
        for name in ("hierarchy", "share_layers"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidArgumentError(f"kv_method_config.{name}", f"must be true or false, got {getattr(self, name)!r}")
        if self.bound not in BOUNDS:
            raise InvalidArgumentError("kv_method_config.bound", f"must be one of {', '.join(BOUNDS)}, got {self.bound!r}")
        if self.granularity not in GRANULARITIES:
            raise InvalidArgumentError("kv_method_config.granularity", f"must be one of {', '.join(GRANULARITIES)}, got {self.granularity!r}")

    def static_kept(self, prompt: int) -> int:
        """Prompt tokens the fixed-ratio static eviction keeps: its ratio, and never fewer than the budget."""
        ratio = 0.3 if self.static_keep is None else self.static_keep
        return min(prompt, max(math.floor(prompt * ratio), self.kept(prompt), 1))


class MPCache(KVMethod):
    name = "mpcache"
    config_class = MPCacheConfig
    config: MPCacheConfig
    block_summary = True
    decode_hooks = True

    def __init__(self, config: MPCacheConfig) -> None:
        super().__init__(config)
        self._last: tuple[int, DecodeGroup, BlockSelection | None] | None = None  # the last selection, for the layer after it

    def check_engine(self, block_size: int) -> None:
        if self.config.granularity == "cluster" and self.config.cluster_size2 % block_size:
            raise InvalidArgumentError("kv_method_config.cluster_size2", f"must be a multiple of block_size ({block_size}): a cluster's bounds are "
                                       f"merged from its blocks', got {self.config.cluster_size2}")

    def shares(self, layer: int) -> bool:
        """Whether ``layer`` reuses the selection of the layer before it."""
        return self.config.share_layers and layer >= SHARE_FROM and (layer - SHARE_FROM) % 2 == 1

    @property
    def window(self) -> int:
        return ALL_QUERIES  # the window is a fraction of each prompt

    def after_prefill(self, prompt: PromptCache) -> torch.Tensor | None:
        n = prompt.num_tokens
        window = max(1, math.floor(n * self.config.window_ratio))
        votes: list[torch.Tensor | None] = [None if self.shares(layer) else static_votes(prompt.window_queries(layer)[-window:], prompt.keys(layer))
                                            for layer in range(prompt.num_layers)]
        kept = self.config.static_kept(n)
        if self.config.gamma is not None:  # every layer keeps as many: the most any layer finds above gamma, the best-voted first
            kept = min(n, max([int((v >= self.config.gamma).sum()) for v in votes if v is not None] + [self.config.kept(n), 1]))
        if kept >= n:
            return None
        positions: list[torch.Tensor] = []
        for v in votes:
            positions.append(positions[-1] if v is None else v.topk(kept).indices.sort().values)
        return torch.stack(positions)[:, None, :].expand(-1, prompt.num_kv_heads, -1)

    def select_blocks(self, q: torch.Tensor, cache: LayerCache, group: DecodeGroup) -> BlockSelection | None:
        if self.shares(cache.index) and self._last is not None and self._last[0] == cache.index - 1 and self._last[1] is group:
            selection = self._last[2]
        else:
            selection = self._select(q, cache, group)
        self._last = (cache.index, group, selection)
        return selection

    def _clusters_read(self, slots: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row, the level-2 clusters in the cache and how many a step reads (the budget, at least the first and last)."""
        size = self.config.cluster_size2
        have = (slots + size - 1) // size
        want = torch.tensor([math.ceil(self.config.kept(t) / size) for t in tokens.tolist()], device=slots.device)
        return have, torch.minimum(torch.maximum(want, have.clamp(max=2)), have)

    def _select(self, q: torch.Tensor, cache: LayerCache, group: DecodeGroup) -> BlockSelection | None:
        cfg, bs, rows = self.config, group.block_size, group.size
        slots = group.context_lens
        have, want = self._clusters_read(slots, slots if group.num_tokens is None else group.num_tokens)
        if bool((want >= have).all()):
            return None
        kv_heads, _, dim = cache.k.shape
        qd = q.float().view(rows, kv_heads, -1, dim).transpose(0, 1)  # [Hkv, rows, g, D]
        table = group.block_ids.view(rows, -1)  # [rows, W], padded with block 0
        if cfg.granularity == "token":
            return self._tokens(qd, cache, table, slots, want * cfg.cluster_size2, bs)
        per1, per2 = cfg.cluster_size1 // bs, cfg.cluster_size2 // bs
        width = table.shape[1]
        padded = math.ceil(width / per1) * per1
        used = (torch.arange(padded, device=q.device)[None, :] < ((slots + bs - 1) // bs)[:, None])[None, :, :, None]  # [1, rows, W', 1]
        bounds = torch.nn.functional.pad(cache.block_summary[:, table].float(), (0, 0, 0, 0, 0, padded - width))  # [Hkv, rows, W', 2, D]
        lo = bounds[..., 0, :].masked_fill(~used, float("inf"))
        hi = bounds[..., 1, :].masked_fill(~used, float("-inf"))
        score2 = self._score(qd, lo, hi, per2, have)
        if cfg.hierarchy:
            level1 = cfg.cluster_size1 // cfg.cluster_size2
            have1 = (slots + cfg.cluster_size1 - 1) // cfg.cluster_size1
            kept1 = _best(self._score(qd, lo, hi, per1, have1), self.level1_kept(have1, want))  # [Hkv, rows, C1]
            score2 = score2.masked_fill(~kept1.repeat_interleave(level1, -1)[..., : score2.shape[-1]], float("-inf"))
            score2 = _pin_ends(score2, have)
        chosen = score2.topk(int(want.max()), dim=-1)  # [Hkv, rows, k], best first
        ranked = (torch.arange(chosen.indices.shape[-1], device=q.device)[None, :] < want[:, None]) & (chosen.values > float("-inf"))
        blocks = (chosen.indices[..., None] * per2 + torch.arange(per2, device=q.device)).flatten(-2)  # [Hkv, rows, k * per2]
        ids = table.expand(kv_heads, -1, -1).gather(2, blocks.clamp(max=width - 1))
        visible = (block_slots(blocks, bs) < slots[None, :, None]) & ranked.repeat_interleave(cfg.cluster_size2, -1)
        return BlockSelection(ids.flatten(1), visible[:, :, None, :])

    def _score(self, qd: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, per: int, have: torch.Tensor) -> torch.Tensor:
        """Clusters of ``per`` blocks scored for each KV head: [Hkv, rows, C], -inf past each row's ``have`` clusters and
        +inf at its first and last."""
        heads, rows, width, dim = lo.shape
        lo = lo.view(heads, rows, width // per, per, dim).amin(3)
        hi = hi.view(heads, rows, width // per, per, dim).amax(3)
        real = (torch.arange(width // per, device=lo.device)[None, :] < have[:, None])[None, :, :, None]
        lo, hi = lo.where(real, 0.0), hi.where(real, 0.0)
        if self.config.bound == "linear":
            scores = qd @ (self.config.alpha * hi + (1 - self.config.alpha) * lo).transpose(-1, -2)
        else:  # the positive part of q meets the max, the negative part the min
            scores = qd.clamp(min=0) @ hi.transpose(-1, -2) + qd.clamp(max=0) @ lo.transpose(-1, -2)
        return _pin_ends(scores.amax(2), have)

    def _tokens(self, qd: torch.Tensor, cache: LayerCache, table: torch.Tensor, slots: torch.Tensor, want: torch.Tensor, bs: int) -> BlockSelection:
        """The token-level ablation: every block read, each row seeing its best ``want`` tokens by exact q . k, the first
        and last clusters' tokens among them."""
        kv_heads, rows = qd.shape[:2]
        keys = cache.k[:, block_slots(table, bs)].float()  # [Hkv, rows, L, D]
        position = torch.arange(keys.shape[2], device=qd.device)[None, :]
        scores = (qd @ keys.transpose(-1, -2)).amax(2)
        size = self.config.cluster_size2
        pinned = (position < size) | (position >= ((slots - 1) // size * size)[:, None])
        scores = scores.masked_fill(pinned[None], float("inf")).masked_fill(position[None] >= slots[None, :, None], float("-inf"))
        want = torch.minimum(want, slots)
        visible = _best(scores, want)
        return BlockSelection(table.expand(kv_heads, -1, -1).flatten(1), visible[:, :, None, :])

    def rows_read(self, num_slots: int, num_tokens: int, block_size: int, group_size: int) -> tuple[int, int]:
        """The selecting layers' reads (the second of a shared pair reads no representatives: an upper bound there):
        one representative K row per scored cluster (two, min and max, for Quest's bound), then the chosen tokens."""
        cfg = self.config
        have, want = (int(t[0]) for t in self._clusters_read(torch.tensor([num_slots]), torch.tensor([num_tokens])))
        if want >= have:
            return num_slots, num_slots
        tokens = min(num_slots, want * cfg.cluster_size2)
        if cfg.granularity == "token":
            return num_slots, tokens
        per_cluster = 1 if cfg.bound == "linear" else 2
        scored = have
        if cfg.hierarchy:
            have1 = math.ceil(num_slots / cfg.cluster_size1)
            scored = have1 + int(self.level1_kept(torch.tensor([have1]), torch.tensor([want]))[0]) * (cfg.cluster_size1 // cfg.cluster_size2)
        return per_cluster * scored + tokens, tokens

    def level1_kept(self, have1: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
        """Large clusters kept at level 1: ``ratio1`` of them, and never too few to hold the ``want`` small clusters
        level 2 reads beside the pinned ends (one more than their parents)."""
        per = self.config.cluster_size1 // self.config.cluster_size2
        return torch.minimum(torch.maximum((have1 * self.config.ratio1).floor().long(), (want + per - 1) // per + 1), have1)

    def clusters_read(self, num_slots: int, num_tokens: int) -> tuple[int, int]:
        """(level-1 clusters kept, level-2 clusters read) by a step over ``num_slots`` retained of ``num_tokens``: the
        counts MPCache makes public under MPC."""
        have, want = self._clusters_read(torch.tensor([num_slots]), torch.tensor([num_tokens]))
        have1 = torch.tensor([math.ceil(num_slots / self.config.cluster_size1)])
        return int(self.level1_kept(have1, want)[0]), int(want[0])


def _pin_ends(scores: torch.Tensor, have: torch.Tensor) -> torch.Tensor:
    """scores [Hkv, rows, C] with each row's first and last real cluster always chosen and those past ``have`` never."""
    index = torch.arange(scores.shape[-1], device=scores.device)[None, :]
    scores = scores.masked_fill((index == 0) | (index == (have - 1)[:, None]), float("inf"))
    return scores.masked_fill(index >= have[:, None], float("-inf"))


def _best(scores: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """A mask [Hkv, rows, C] of each row's ``count`` best scores."""
    top = scores.topk(int(count.max()), dim=-1).indices
    ranked = torch.arange(top.shape[-1], device=scores.device)[None, :] < count[:, None]
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, ranked.expand_as(top))


def static_votes(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """queries [w, H, D] of the prompt's last w tokens, keys [Hkv, n, D] -> [n]: the largest attention any window
    query gives each token, averaged over the query heads (fp32)."""
    w, n = queries.shape[0], keys.shape[1]
    votes = torch.zeros(n, device=keys.device)
    for lo in range(0, w, QUERY_CHUNK):
        probs = prompt_attention(queries[lo : lo + QUERY_CHUNK], keys, n - w + lo)  # [Hkv, g, chunk, n]
        votes = torch.maximum(votes, probs.mean((0, 1)).amax(0))
    return votes
