"""The JAX programs SPU runs for one layer of a private decoding step: full-cache attention and MPCache's, operator by
operator. Runs in the MPC environment (numpy < 2, jax <= 0.4.34, spu): it imports neither torch nor the rest of kvtier.

Shapes: one decode query per sequence, grouped-query attention: q [Hkv, g, D] (RoPE applied), the cache's keys
transposed, kt [Hkv, D, T], its values v [Hkv, T, D], the clusters' elementwise key bounds, transposed too, lo1, hi1
[Hkv, D, C1] and lo2, hi2 [Hkv, D, C2] (kept up to date as tokens are appended). Keys and bounds are stored
transposed because SPU's Beaver cache finds a cached operand of ``q . K^T`` only in that layout. Everything secret but
the shapes and the counts MPCache makes public: T, the cluster sizes, how many clusters each level keeps.

MPCache's selection is the plaintext method's (kvtier/kv_methods/mpcache.py): a cluster's score is the best of the
query heads that share its KV head; the first and last clusters are always kept (public positions: a public bonus);
level 2 scores only the children of the kept level-1 clusters (a mask: scores against the level's k-th best); the chosen
clusters' scores are gathered by a one-hot matrix product, so their indices stay secret.

Values written once and read at every later step (K, V, the clusters' bounds) pass through ``fixed``: under semi2k,
SPU's Beaver cache then opens each one's masked value once and reuses it in every later product, so a step's products
with the cache send only their other operand and their result.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from spu.experimental import make_cached_var

PIN = 1e4  # a public bonus that puts the first and last clusters above any score (|q . r| stays far below it)
MASKED = -100.0  # added to a score attention must skip: its exp is 0 in fixed point (SPU's exp goes wrong far below -1000)


def fixed(x: jnp.ndarray) -> jnp.ndarray:
    """``x`` marked as written once (SPU's ``make_cached_var``): semi2k opens its Beaver mask at its first product and
    reuses it in every later one, in this program and the next ones, for as long as the value stays in the parties'
    runtimes. A no-op under ABY3 and Cheetah, whose products never open their operands."""
    return make_cached_var(x)


def scores(q: jnp.ndarray, kt: jnp.ndarray, scale: float) -> jnp.ndarray:
    """q [Hkv, g, D] . kt [Hkv, D, N] -> [Hkv, g, N], scaled."""
    return jnp.einsum("hgd,hdn->hgn", q, kt) * scale


def softmax(s: jnp.ndarray) -> jnp.ndarray:
    """Probabilities, for the static eviction's votes; attention itself normalises after the product with V."""
    e, inv = exp_scores(s)
    return e * inv


def exp_scores(s: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """exp(s - max) and the reciprocal of its row sums. One secret reciprocal a row, then products: dividing by the
    broadcast sum runs SPU's division (a Goldschmidt iteration) on every element, 3.6x the bytes of the whole softmax
    at 4K tokens. Attention applies it after the product with V, to D numbers a row instead of T. With 22 fraction
    bits the reciprocal's error, times a 4K row's sum, stays near 1e-3 of the result."""
    e = jnp.exp(s - s.max(-1, keepdims=True))
    return e, 1.0 / e.sum(-1, keepdims=True)


def weighted_sum(p: jnp.ndarray, values: jnp.ndarray) -> jnp.ndarray:
    """p [Hkv, g, N] . values [Hkv, N, D] -> [Hkv, g, D]."""
    return jnp.einsum("hgn,hnd->hgd", p, values)


def cache_scores(q: jnp.ndarray, kts: Sequence[jnp.ndarray], scale: float) -> jnp.ndarray:
    """``scores`` over a cache held in parts along its tokens (private generation: the prompt's, written once and
    ``fixed``, then the tokens decoded since), one product a part: [Hkv, g, N1 + N2 + ...]."""
    return jnp.concatenate([scores(q, kt, scale) for kt in kts], -1)


def cache_sum(p: jnp.ndarray, vs: Sequence[jnp.ndarray]) -> jnp.ndarray:
    """``weighted_sum`` over a cache held in parts: each part's slice of p times its values, summed."""
    ends = np.cumsum([0] + [v.shape[1] for v in vs])
    return sum(weighted_sum(p[..., a:b], v) for a, b, v in zip(ends[:-1], ends[1:], vs))


def attention(q: jnp.ndarray, kts: Sequence[jnp.ndarray], vs: Sequence[jnp.ndarray], scale: float) -> jnp.ndarray:
    """Attention over a cache held in parts (one part: the whole cache)."""
    e, inv = exp_scores(cache_scores(q, kts, scale))
    return cache_sum(e, vs) * inv


@dataclass(frozen=True)
class Bound:
    """How a cluster is scored from its keys' elementwise min and max (``lo``, ``hi`` [Hkv, D, C]): the paper's
    linearised q . (alpha hi + (1 - alpha) lo), one secret mat-vec; or Quest's exact sum_d max(q_d hi_d, q_d lo_d),
    which needs no comparison per cluster either: as hi >= lo, the positive part of q meets hi and the negative part
    lo, so one ReLU of q (D comparisons per query head) and two mat-vecs give it exactly."""

    kind: str = "linear"  # or "quest"
    alpha: float = 0.6

    def __call__(self, q: jnp.ndarray, lo: jnp.ndarray, hi: jnp.ndarray) -> jnp.ndarray:
        """Every cluster's score for a KV head's best query head: [Hkv, C]."""
        if self.kind == "linear":  # two products with the bounds themselves, so a fixed bound's mask serves every step
            s = self.alpha * jnp.einsum("hgd,hdc->hgc", q, hi) + (1 - self.alpha) * jnp.einsum("hgd,hdc->hgc", q, lo)
        else:
            positive = jnp.maximum(q, 0.0)
            s = jnp.einsum("hgd,hdc->hgc", positive, hi) + jnp.einsum("hgd,hdc->hgc", q - positive, lo)
        return s.max(1)


@dataclass(frozen=True)
class Plan:
    """MPCache's public side of one step: clusters kept per level, level-2 clusters per level-1 one, their size."""

    keep1: int
    keep2: int
    size: int  # tokens in a level-2 cluster
    per: int
    bound: Bound = Bound()
    hierarchy: bool = True
    bits: bool = False  # the one-hot rows from the indices' bits (``one_hot``): the cheaper way under semi2k


def one_hot_by_bits(protocol: str) -> bool:
    """Whether ``one_hot`` should spell the indices' bits under ``protocol``: under semi2k an equality test costs about
    2.3x the bytes of the products that replace it; under ABY3 it is the cheaper of the two."""
    return protocol == "semi2k"


def pin_ends(s: jnp.ndarray) -> jnp.ndarray:
    bonus = jnp.zeros(s.shape[-1]).at[0].set(PIN).at[-1].set(PIN)
    return s + bonus


def top_clusters(s: jnp.ndarray, count: int) -> jnp.ndarray:
    """Secret top-k: the indices [Hkv, count] of each KV head's best clusters."""
    return jax.lax.top_k(s, count)[1]


def one_hot(index: jnp.ndarray, clusters: int, bits: bool = False) -> jnp.ndarray:
    """[Hkv, k] secret indices -> [Hkv, k, clusters] secret one-hot rows: an equality test against each public position,
    or with ``bits`` from the indices' log2(C) bits (the paper's gather works at that width): each half of the bits
    spelled out as a one-hot table by doubling, then the two tables' outer product, one secret product a position.
    Integers, not fixed point: a product with them needs no truncation, which under ABY3 costs more than the gather's
    product itself when the rows come into a program as fixed-point values."""
    if not bits:
        return (index[..., None] == jnp.arange(clusters)).astype(jnp.int32)
    width = max(1, (clusters - 1).bit_length())
    digits = [jnp.right_shift(index, j) & 1 for j in range(width)]
    low, high = bit_table(digits[: width // 2], index.shape), bit_table(digits[width // 2:], index.shape)
    return (high[..., :, None] * low[..., None, :]).reshape(*index.shape, -1)[..., :clusters]


def bit_table(digits: list[jnp.ndarray], shape: tuple[int, ...]) -> jnp.ndarray:
    """The one-hot rows [*shape, 2^len(digits)] of the values these secret bits spell, least significant first."""
    table = jnp.ones((*shape, 1), jnp.int32)
    for digit in digits:
        hit = table * digit[..., None]
        table = jnp.concatenate([table - hit, hit], -1)
    return table


def kept_clusters(s: jnp.ndarray, count: int) -> jnp.ndarray:
    """[Hkv, C] -> 1 for each KV head's ``count`` best clusters, else 0: one comparison per cluster against the
    count-th best score (secret top-k values), where one-hot rows of their indices would cost count x C equalities."""
    return (s >= jax.lax.top_k(s, count)[0][..., -1:]).astype(jnp.float32)


def child_mask(kept: jnp.ndarray, per: int) -> jnp.ndarray:
    """The level-2 penalty: 0 for children of a kept level-1 cluster, -2 PIN for the rest (so pinned ends survive)."""
    return (jnp.repeat(kept, per, axis=-1) - 1) * 2 * PIN


def by_cluster(x: jnp.ndarray, size: int) -> jnp.ndarray:
    """[Hkv, g, C * size] -> [Hkv, C, g * size]: each cluster's entries for every query head, one row a cluster."""
    heads, g, n = x.shape
    return x.reshape(heads, g, n // size, size).transpose(0, 2, 1, 3).reshape(heads, n // size, g * size)


def by_head(x: jnp.ndarray, g: int) -> jnp.ndarray:
    """The inverse of ``by_cluster``: [Hkv, C, g * size] -> [Hkv, g, C * size]."""
    heads, clusters, width = x.shape
    return x.reshape(heads, clusters, g, width // g).transpose(0, 2, 1, 3).reshape(heads, g, -1)


def gather_clusters(onehot: jnp.ndarray, s: jnp.ndarray, size: int) -> jnp.ndarray:
    """The chosen clusters' entries of s [Hkv, g, C * size], by a product with the one-hot rows [Hkv, k, C]:
    [Hkv, g, k * size]."""
    return by_head(jnp.einsum("hkc,hcx->hkx", onehot, by_cluster(s, size)), s.shape[1])


def scatter_clusters(onehot: jnp.ndarray, e: jnp.ndarray, size: int) -> jnp.ndarray:
    """The inverse placement: e [Hkv, g, k * size] back at its clusters' slots, zero elsewhere: [Hkv, g, C * size]."""
    return by_head(jnp.einsum("hkc,hkx->hcx", onehot, by_cluster(e, size)), e.shape[1])


def sparse_attention(q: jnp.ndarray, kts: Sequence[jnp.ndarray], vs: Sequence[jnp.ndarray], onehot: jnp.ndarray, size: int, scale: float,
                     valid: jnp.ndarray | None = None) -> jnp.ndarray:
    """Attention over the clusters the one-hot rows [Hkv, k, C] choose from the cache (C * size tokens, in parts): every
    key's score from one product with the cache, the chosen clusters' scores gathered by a product with the one-hot
    rows, the softmax over those alone, its probabilities put back in place by the transposed one-hot, and one product
    with the cache's values. The gathers move g numbers a token, not D, and both products with the cache have an
    operand that ``fixed`` can cache. ``valid`` (public, [C * size]): 0 at slots past the cache's end."""
    s = cache_scores(q, kts, scale)
    if valid is not None:
        s = s + (1 - valid) * MASKED
    e, inv = exp_scores(gather_clusters(onehot, s, size))
    return cache_sum(scatter_clusters(onehot, e, size), vs) * inv


def select(q: jnp.ndarray, lo1: jnp.ndarray, hi1: jnp.ndarray, lo2: jnp.ndarray, hi2: jnp.ndarray, plan: Plan) -> tuple[jnp.ndarray, jnp.ndarray]:
    """MPCache's two levels from the clusters' bounds: the one-hot rows [Hkv, keep2, C2] of the chosen level-2 clusters,
    and their indices. A partial last level-1 cluster may have fewer children than a whole one."""
    s2 = plan.bound(q, lo2, hi2)
    if plan.hierarchy:
        kept1 = kept_clusters(pin_ends(plan.bound(q, lo1, hi1)), plan.keep1)
        s2 = s2 + child_mask(kept1, plan.per)[..., : s2.shape[-1]]
    index = top_clusters(pin_ends(s2), plan.keep2)
    return one_hot(index, s2.shape[-1], plan.bits), index


def mpcache_attention(q: jnp.ndarray, kt: jnp.ndarray, v: jnp.ndarray, lo1: jnp.ndarray, hi1: jnp.ndarray, lo2: jnp.ndarray, hi2: jnp.ndarray,
                      scale: float, plan: Plan) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Attention over the chosen clusters only, and the chosen indices (revealed by the caller for checking only)."""
    onehot, index = select(q, lo1, hi1, lo2, hi2, plan)
    return sparse_attention(q, [kt], [v], onehot, plan.size, scale), index


@dataclass(frozen=True)
class Stage:
    """One operator of the breakdown: its own SPU program, reading and writing named secret values."""

    name: str  # the operator class the report sums it under
    fn: Callable
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


def score_stage(scale: float) -> Stage:
    """Every key's score, from one product with the ``fixed`` keys."""
    return Stage("attention matmuls", lambda q, k: scores(q, fixed(k), scale), ("q", "k"), ("s",))


def value_stages(probs: str) -> list[Stage]:
    """The product of the (unnormalised) probabilities named ``probs`` with the ``fixed`` values, then the softmax's
    reciprocal."""
    return [Stage("attention matmuls", lambda p, v: weighted_sum(p, fixed(v)), (probs, "v"), ("u",)),
            Stage("softmax", lambda u, inv: u * inv, ("u", "inv"), ("out",))]


def attention_stages(scale: float) -> list[Stage]:
    """Full-cache attention operator by operator; the cache ``fixed``."""
    return [score_stage(scale), Stage("softmax", exp_scores, ("s",), ("e", "inv")), *value_stages("e")]


def mpcache_stages(scale: float, plan: Plan) -> list[Stage]:
    """MPCache's layer operator by operator; the cache and its bounds ``fixed``."""
    stages = [Stage("similarity", lambda q, lo2, hi2: plan.bound(q, fixed(lo2), fixed(hi2)), ("q", "lo2", "hi2"), ("s2",))]
    if plan.hierarchy:
        stages += [Stage("similarity", lambda q, lo1, hi1: pin_ends(plan.bound(q, fixed(lo1), fixed(hi1))), ("q", "lo1", "hi1"), ("s1",)),
                   Stage("top-k", lambda s1: kept_clusters(s1, plan.keep1), ("s1",), ("kept1",)),
                   Stage("similarity", lambda kept1, s2: s2 + child_mask(kept1, plan.per)[..., : s2.shape[-1]], ("kept1", "s2"), ("s2",))]
    return [*stages,
            Stage("top-k", lambda s2: top_clusters(pin_ends(s2), plan.keep2), ("s2",), ("i2",)),
            Stage("one-hot", lambda i2, s2: one_hot(i2, s2.shape[-1], plan.bits), ("i2", "s2"), ("onehot",)),
            score_stage(scale),
            Stage("gather", lambda onehot, s: gather_clusters(onehot, s, plan.size), ("onehot", "s"), ("s_sel",)),
            Stage("softmax", exp_scores, ("s_sel",), ("e", "inv")),
            Stage("gather", lambda onehot, e: scatter_clusters(onehot, e, plan.size), ("onehot", "e"), ("p",)),
            *value_stages("p")]
