"""A Llama decoder as JAX programs for SPU: prefill, MPCache's look-once eviction, and one decoding step with the full
cache or MPCache, every weight, activation and cache entry secret. Runs in the MPC environment (no torch, no kvtier).

The weights stay in the parties' runtimes from the prefill to the last step and pass through ``fixed``: under semi2k
their Beaver masks are opened once, at the prefill, and every later product with them sends only the activations and
the result.

Public: the model's shape, positions (so RoPE's cos and sin are constants), the number of tokens so far, and the
counts MPCache makes public (tokens kept by the static eviction, clusters kept per level). Secret: the prompt, the
weights, every activation, the KV cache, the clusters' bounds, which tokens were kept and which clusters were read,
and each generated token until the client reveals it (its one-hot row feeds the next step without leaving MPC).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from spu_programs import MASKED, Plan, attention, exp_scores, fixed, select, softmax, sparse_attention

BIG = 1e4  # a public bound no key coordinate reaches: the neutral element of a cluster's min (and -BIG of its max)


@dataclass(frozen=True)
class Shape:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    vocab: int
    eps: float
    theta: float

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads


LAYER_WEIGHTS = ("input_layernorm", "q_proj", "k_proj", "v_proj", "o_proj", "post_attention_layernorm", "gate_proj", "up_proj", "down_proj")


def rope_tables(shape: Shape, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HF Llama's default RoPE at public positions: cos and sin [n, head_dim]."""
    inv = 1.0 / shape.theta ** (np.arange(0, shape.head_dim, 2, dtype=np.float64) / shape.head_dim)
    angles = positions[:, None].astype(np.float64) * inv[None, :]
    angles = np.concatenate([angles, angles], -1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def rope(x: jnp.ndarray, cos: np.ndarray, sin: np.ndarray) -> jnp.ndarray:
    half = x.shape[-1] // 2
    return x * cos + jnp.concatenate([-x[..., half:], x[..., :half]], -1) * sin


def rms_norm(x: jnp.ndarray, w: jnp.ndarray, eps: float) -> jnp.ndarray:
    return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + eps) * w


def project(shape: Shape, w: dict, x: jnp.ndarray, cos: np.ndarray, sin: np.ndarray) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """x [n, hidden] -> q [Hkv, g, n, D], k and v [Hkv, n, D], RoPE applied."""
    n, d = x.shape[0], shape.head_dim
    h = rms_norm(x, w["input_layernorm"], shape.eps)
    q = (h @ w["q_proj"].T).reshape(n, shape.kv_heads, shape.group, d).transpose(1, 2, 0, 3)
    k = (h @ w["k_proj"].T).reshape(n, shape.kv_heads, d).transpose(1, 0, 2)
    v = (h @ w["v_proj"].T).reshape(n, shape.kv_heads, d).transpose(1, 0, 2)
    return rope(q, cos, sin), rope(k, cos, sin), v


def finish(shape: Shape, w: dict, x: jnp.ndarray, attended: jnp.ndarray) -> jnp.ndarray:
    """The rest of a layer: attended [Hkv, g, n, D] through o_proj, the residual, and the SiLU MLP."""
    n = x.shape[0]
    x = x + attended.transpose(2, 0, 1, 3).reshape(n, -1) @ w["o_proj"].T
    h = rms_norm(x, w["post_attention_layernorm"], shape.eps)
    gate = h @ w["gate_proj"].T
    return x + (gate * jax.nn.sigmoid(gate) * (h @ w["up_proj"].T)) @ w["down_proj"].T


def next_token(shape: Shape, weights: dict, x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Greedy decoding under MPC: the last position's secret argmax as an index and a one-hot row, and its logits."""
    logits = (rms_norm(x[-1:], weights["norm"], shape.eps) @ weights["lm_head"].T)[0]
    index = jnp.argmax(logits)
    return index, (jnp.arange(shape.vocab) == index).astype(jnp.float32)[None, :], logits


def prefill(shape: Shape, weights: dict, onehot: jnp.ndarray, window: int) -> tuple:
    """The prompt (secret one-hot rows [n, V]) through every layer with causal attention: the next token (index and
    one-hot), each layer's cache {"kt": K transposed [Hkv, D, n], "v": V [Hkv, n, D]}, each layer's last ``window``
    queries [Hkv, g, window, D], the logits."""
    n = onehot.shape[0]
    cos, sin = rope_tables(shape, np.arange(n))
    weights = jax.tree_util.tree_map(fixed, weights)
    x = onehot @ weights["embed"]
    causal = np.where(np.arange(n)[None, :] <= np.arange(n)[:, None], 0.0, MASKED).astype(np.float32)
    caches, windows = [], []
    for w in weights["layers"]:
        q, k, v = project(shape, w, x, cos, sin)
        s = jnp.einsum("hgnd,htd->hgnt", q, k) * shape.head_dim ** -0.5 + causal
        e, inv = exp_scores(s)
        attended = jnp.einsum("hgnt,htd->hgnd", e, v) * inv
        x = finish(shape, w, x, attended)
        caches.append({"kt": k.transpose(0, 2, 1), "v": v})
        windows.append(q[:, :, n - window:])
    index, row, logits = next_token(shape, weights, x)
    return index, row, caches, windows, logits


def evict(shape: Shape, keys: jnp.ndarray, values: jnp.ndarray, queries: jnp.ndarray | None, kept: int,
          previous: jnp.ndarray | None) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """MPCache's look-once static eviction of one layer: each prompt token's vote is the largest head-mean attention
    any window query gives it; the best ``kept`` stay, in prompt order (a secret sort of their secret positions), and
    are moved into place by a one-hot product. ``previous``: the one-hot rows of the layer this one shares with."""
    if previous is None:
        n, window = keys.shape[1], queries.shape[2]
        causal = np.where(np.arange(n)[None, :] <= np.arange(n - window, n)[:, None], 0.0, MASKED).astype(np.float32)
        s = jnp.einsum("hgwd,htd->hgwt", queries, keys) * shape.head_dim ** -0.5 + causal
        votes = softmax(s).mean((0, 1)).max(0)
        positions = jnp.sort(jax.lax.top_k(votes, kept)[1])
        previous = (positions[:, None] == jnp.arange(n)).astype(jnp.float32)  # [kept, n]
    return jnp.einsum("kn,hnd->hkd", previous, keys), jnp.einsum("kn,hnd->hkd", previous, values), previous


def cluster_bounds(keys: jnp.ndarray, size: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Elementwise min and max of each run of ``size`` consecutive keys [Hkv, T, D] (the last run may be partial)."""
    heads, n, d = keys.shape
    pad = -n % size
    lo = jnp.pad(keys, ((0, 0), (0, pad), (0, 0)), constant_values=BIG).reshape(heads, -1, size, d).min(2)
    hi = jnp.pad(keys, ((0, 0), (0, pad), (0, 0)), constant_values=-BIG).reshape(heads, -1, size, d).max(2)
    return lo, hi


def append_bounds(lo: jnp.ndarray, hi: jnp.ndarray, key: jnp.ndarray, slot: int, size: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """The bounds after writing ``key`` [Hkv, D] to public slot ``slot``: a new cluster, or the last one widened (two
    secret comparisons per coordinate, whatever the context length)."""
    if slot % size == 0:
        return jnp.concatenate([lo, key[:, None]], 1), jnp.concatenate([hi, key[:, None]], 1)
    c = slot // size
    return lo.at[:, c].set(jnp.minimum(lo[:, c], key)), hi.at[:, c].set(jnp.maximum(hi[:, c], key))


def cluster_attention(q: jnp.ndarray, kts: list[jnp.ndarray], vs: list[jnp.ndarray], rows: jnp.ndarray, size: int, scale: float) -> jnp.ndarray:
    """Attention over the chosen clusters only, from a cache in parts; slots past the cache's end in a partial last
    cluster are masked (padding the last part)."""
    slots = sum(v.shape[1] for v in vs)
    pad = -slots % size
    valid = (np.arange(slots + pad) < slots).astype(np.float32)  # public
    kts = [*kts[:-1], jnp.pad(kts[-1], ((0, 0), (0, 0), (0, pad)))]
    vs = [*vs[:-1], jnp.pad(vs[-1], ((0, 0), (0, pad), (0, 0)))]
    return sparse_attention(q, kts, vs, rows, size, scale, valid)


def decode(shape: Shape, weights: dict, row: jnp.ndarray, caches: list, position: int, selections: list[Plan | None] | None,
           shares: list[bool]) -> tuple:
    """One decoding step for the token in ``row`` (secret one-hot [1, V]) at public ``position``: the next token
    (index, one-hot row), what changed in each layer's cache, and the logits. ``caches``: per layer the prompt's part,
    "kt" (K transposed) and "v", written once and ``fixed``, so under semi2k their masks open at the first step only;
    "tail", the (K, V) of the tokens decoded before this one (None at the first step); with MPCache the clusters'
    "bounds". The step returns the tail with this token's K and V appended, and the bounds. ``selections``: per layer
    the step's public counts (None: every cluster is read); None: the full cache."""
    cos, sin = rope_tables(shape, np.array([position]))
    weights = jax.tree_util.tree_map(fixed, weights)
    x = row @ weights["embed"]
    scale = shape.head_dim ** -0.5
    updated, rows = [], None
    for layer, (w, cache) in enumerate(zip(weights["layers"], caches)):
        q, k, v = project(shape, w, x, cos, sin)
        tail = (k, v) if cache["tail"] is None else (jnp.concatenate([cache["tail"][0], k], 1), jnp.concatenate([cache["tail"][1], v], 1))
        kts, vs = [fixed(cache["kt"]), tail[0].transpose(0, 2, 1)], [fixed(cache["v"]), tail[1]]
        slots = cache["v"].shape[1] + tail[1].shape[1]
        q = q[:, :, 0]
        if selections is None:
            updated.append({"tail": tail})
            attended = attention(q, kts, vs, scale)
        else:
            sel, bounds = selections[layer], dict(cache["bounds"])
            for level, size in ((1, sel.size * sel.per), (2, sel.size)):
                bounds[f"lo{level}"], bounds[f"hi{level}"] = append_bounds(bounds[f"lo{level}"], bounds[f"hi{level}"], k[:, 0], slots - 1, size)
            updated.append({"tail": tail, "bounds": bounds})
            if sel.keep2 >= -(-slots // sel.size):
                rows, attended = None, attention(q, kts, vs, scale)
            else:
                if not shares[layer] or rows is None:
                    rows = select(q, *(bounds[n].transpose(0, 2, 1) for n in ("lo1", "hi1", "lo2", "hi2")), sel)[0]
                attended = cluster_attention(q, kts, vs, rows, sel.size, scale)
        x = finish(shape, w, x, attended[:, :, None])
    index, row, logits = next_token(shape, weights, x)
    return index, row, updated, logits
