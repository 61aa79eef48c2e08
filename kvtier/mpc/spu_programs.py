"""The JAX programs SPU runs for one layer of a private decoding step: full-cache attention and MPCache's, operator by
operator. Runs in the MPC environment (numpy < 2, jax <= 0.4.34, spu): it imports neither torch nor the rest of kvtier.

Shapes: one decode query per sequence, grouped-query attention: q [Hkv, g, D] (RoPE applied), the cache K, V
[Hkv, T, D], the clusters' elementwise key bounds lo1, hi1 [Hkv, C1, D] and lo2, hi2 [Hkv, C2, D] (kept up to date
as tokens are appended). Everything secret but the shapes and the counts MPCache makes public: T, the
cluster sizes, how many clusters each level keeps.

MPCache's selection is the plaintext method's (kvtier/kv_methods/mpcache.py): a cluster's score is the best of the
query heads that share its KV head; the first and last clusters are always kept (public positions: a public bonus);
level 2 scores only the children of the kept level-1 clusters (a mask: scores against the level's k-th best); the chosen
level-2 clusters are gathered by a one-hot matrix product, so their indices stay secret.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp

PIN = 1e4  # a public bonus that puts the first and last clusters above any score (|q . r| stays far below it)
MASKED = -100.0  # added to a score attention must skip: its exp is 0 in fixed point (SPU's exp goes wrong far below -1000)


def scores(q: jnp.ndarray, keys: jnp.ndarray, scale: float) -> jnp.ndarray:
    """q [Hkv, g, D] . keys [Hkv, N, D] -> [Hkv, g, N], scaled."""
    return jnp.einsum("hgd,hnd->hgn", q, keys) * scale


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


def attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, scale: float) -> jnp.ndarray:
    e, inv = exp_scores(scores(q, k, scale))
    return weighted_sum(e, v) * inv


@dataclass(frozen=True)
class Bound:
    """How a cluster is scored from its keys' elementwise min and max (``lo``, ``hi`` [Hkv, C, D]): the paper's
    linearised q . (alpha hi + (1 - alpha) lo), one secret mat-vec; or Quest's exact sum_d max(q_d hi_d, q_d lo_d),
    which needs no comparison per cluster either: as hi >= lo, the positive part of q meets hi and the negative part
    lo, so one ReLU of q (D comparisons per query head) and two mat-vecs give it exactly."""

    kind: str = "linear"  # or "quest"
    alpha: float = 0.6

    def __call__(self, q: jnp.ndarray, lo: jnp.ndarray, hi: jnp.ndarray) -> jnp.ndarray:
        """Every cluster's score for a KV head's best query head: [Hkv, C]."""
        if self.kind == "linear":
            s = jnp.einsum("hgd,hcd->hgc", q, self.alpha * hi + (1 - self.alpha) * lo)
        else:
            positive = jnp.maximum(q, 0.0)
            s = jnp.einsum("hgd,hcd->hgc", positive, hi) + jnp.einsum("hgd,hcd->hgc", q - positive, lo)
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


def pin_ends(s: jnp.ndarray) -> jnp.ndarray:
    bonus = jnp.zeros(s.shape[-1]).at[0].set(PIN).at[-1].set(PIN)
    return s + bonus


def top_clusters(s: jnp.ndarray, count: int) -> jnp.ndarray:
    """Secret top-k: the indices [Hkv, count] of each KV head's best clusters."""
    return jax.lax.top_k(s, count)[1]


def one_hot(index: jnp.ndarray, clusters: int) -> jnp.ndarray:
    """[Hkv, k] secret indices -> [Hkv, k, clusters] secret one-hot rows (an equality test against public positions).
    Integers, not fixed point: a product with them needs no truncation, which under ABY3 costs more than the gather's
    product itself when the rows come into a program as fixed-point values."""
    return (index[..., None] == jnp.arange(clusters)).astype(jnp.int32)


def kept_clusters(s: jnp.ndarray, count: int) -> jnp.ndarray:
    """[Hkv, C] -> 1 for each KV head's ``count`` best clusters, else 0: one comparison per cluster against the
    count-th best score (secret top-k values), where one-hot rows of their indices would cost count x C equalities."""
    return (s >= jax.lax.top_k(s, count)[0][..., -1:]).astype(jnp.float32)


def child_mask(kept: jnp.ndarray, per: int) -> jnp.ndarray:
    """The level-2 penalty: 0 for children of a kept level-1 cluster, -2 PIN for the rest (so pinned ends survive)."""
    return (jnp.repeat(kept, per, axis=-1) - 1) * 2 * PIN


def gather(onehot: jnp.ndarray, blocks: jnp.ndarray, size: int) -> jnp.ndarray:
    """onehot [Hkv, k, C] . the cache as clusters [Hkv, C, size * D] -> the chosen clusters' tokens [Hkv, k * size, D]."""
    heads, clusters = blocks.shape[0], onehot.shape[-1]
    flat = blocks.reshape(heads, clusters, -1)
    return jnp.einsum("hkc,hcx->hkx", onehot, flat).reshape(heads, -1, blocks.shape[-1])


def select(q: jnp.ndarray, lo1: jnp.ndarray, hi1: jnp.ndarray, lo2: jnp.ndarray, hi2: jnp.ndarray, plan: Plan) -> tuple[jnp.ndarray, jnp.ndarray]:
    """MPCache's two levels from the clusters' bounds: the one-hot rows [Hkv, keep2, C2] of the chosen level-2 clusters,
    and their indices. A partial last level-1 cluster may have fewer children than a whole one."""
    s2 = plan.bound(q, lo2, hi2)
    if plan.hierarchy:
        kept1 = kept_clusters(pin_ends(plan.bound(q, lo1, hi1)), plan.keep1)
        s2 = s2 + child_mask(kept1, plan.per)[..., : s2.shape[-1]]
    index = top_clusters(pin_ends(s2), plan.keep2)
    return one_hot(index, s2.shape[-1]), index


def mpcache_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, lo1: jnp.ndarray, hi1: jnp.ndarray, lo2: jnp.ndarray, hi2: jnp.ndarray,
                      scale: float, plan: Plan) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Attention over the chosen clusters only, and the chosen indices (revealed by the caller for checking only)."""
    onehot, index = select(q, lo1, hi1, lo2, hi2, plan)
    return attention(q, gather(onehot, k, plan.size), gather(onehot, v, plan.size), scale), index


@dataclass(frozen=True)
class Stage:
    """One operator of the breakdown: its own SPU program, reading and writing named secret values."""

    name: str  # the operator class the report sums it under
    fn: Callable
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


def attention_stages(scale: float, keys: str = "k", values: str = "v") -> list[Stage]:
    return [Stage("attention matmuls", lambda q, k: scores(q, k, scale), ("q", keys), ("s",)),
            Stage("softmax", exp_scores, ("s",), ("e", "inv")),
            Stage("attention matmuls", weighted_sum, ("e", values), ("u",)),
            Stage("softmax", lambda u, inv: u * inv, ("u", "inv"), ("out",))]


def mpcache_stages(scale: float, plan: Plan) -> list[Stage]:
    """MPCache's layer operator by operator."""
    stages = [Stage("similarity", lambda q, lo2, hi2: plan.bound(q, lo2, hi2), ("q", "lo2", "hi2"), ("s2",))]
    if plan.hierarchy:
        stages += [Stage("similarity", lambda q, lo1, hi1: pin_ends(plan.bound(q, lo1, hi1)), ("q", "lo1", "hi1"), ("s1",)),
                   Stage("top-k", lambda s1: kept_clusters(s1, plan.keep1), ("s1",), ("kept1",)),
                   Stage("similarity", lambda kept1, s2: s2 + child_mask(kept1, plan.per)[..., : s2.shape[-1]], ("kept1", "s2"), ("s2",))]
    stages += [Stage("top-k", lambda s2: top_clusters(pin_ends(s2), plan.keep2), ("s2",), ("i2",)),
               Stage("one-hot", lambda i2, s2: one_hot(i2, s2.shape[-1]), ("i2", "s2"), ("onehot",)),
               Stage("gather", lambda onehot, k, v: (gather(onehot, k, plan.size), gather(onehot, v, plan.size)), ("onehot", "k", "v"), ("k_sel", "v_sel"))]
    return stages + attention_stages(scale, "k_sel", "v_sel")
