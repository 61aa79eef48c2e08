"""One layer of one decode step, taken from kvtier's engine running MPCache in plaintext: the query, the retained K and
V in slot order, and the clusters the plaintext method read. Private decoding computes the same layer from these
under MPC; comparing the two checks the MPC programs against the engine."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from kvtier import LLM, SamplingParams
from kvtier.cache.ops import block_slots
from kvtier.kv_methods.mpcache import MPCache


@dataclass
class LayerStep:
    layer: int
    tokens: int  # tokens computed, the decoding one included
    q: np.ndarray  # [Hkv, g, D], RoPE applied
    k: np.ndarray  # [Hkv, T, D], the retained cache in slot order
    v: np.ndarray
    scale: float
    read: list[list[int]]  # per KV head, the level-2 clusters the plaintext method read (ascending)
    keep1: int  # public counts
    keep2: int

    def bounds(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        """The elementwise min and max of every run of ``size`` consecutive keys: [Hkv, T / size, D] each."""
        heads, slots, dim = self.k.shape
        clusters = self.k.reshape(heads, slots // size, size, dim)
        return clusters.min(2), clusters.max(2)

    def plaintext_attention(self, size: int, full: bool = False) -> np.ndarray:
        """Attention over the read clusters' tokens (``full``: over the whole retained cache) in float64: [Hkv, g, D]."""
        out = np.zeros(self.q.shape, dtype=np.float64)
        for h, clusters in enumerate(self.read):
            rows = np.arange(self.k.shape[1]) if full else np.concatenate([np.arange(c * size, (c + 1) * size) for c in clusters])
            s = self.q[h].astype(np.float64) @ self.k[h, rows].T.astype(np.float64) * self.scale
            p = np.exp(s - s.max(-1, keepdims=True))
            out[h] = (p / p.sum(-1, keepdims=True)) @ self.v[h, rows].astype(np.float64)
        return out


class _Recorder(MPCache):
    """MPCache that also keeps, for one layer, every decode step whose retained cache fills whole level-1 clusters (the
    MPC programs take the cache as whole clusters)."""

    def __init__(self, method: MPCache, layer: int) -> None:
        super().__init__(method.config)
        self.layer = layer
        self.steps: list[LayerStep] = []

    def select_blocks(self, q, cache, group):
        selection = super().select_blocks(q, cache, group)
        slots, tokens = int(group.context_lens[0]), int(group.num_tokens[0]) if group.num_tokens is not None else int(group.context_lens[0])
        cfg = self.config
        if cache.index != self.layer or slots % cfg.cluster_size1 or selection is None:
            return selection
        table = group.block_ids.view(group.size, -1)[0]
        order = block_slots(table, group.block_size)[:slots]
        heads, _, dim = cache.k.shape
        per2 = cfg.cluster_size2 // group.block_size
        position = {int(b): i for i, b in enumerate(table[: math.ceil(slots / group.block_size)].tolist())}
        seen = selection.mask.view(heads, -1, group.block_size).any(-1)
        read = [sorted({position[int(b)] // per2 for b in selection.block_ids[h][seen[h]].tolist()}) for h in range(heads)]
        keep1, keep2 = self.clusters_read(slots, tokens)
        self.steps.append(LayerStep(cache.index, tokens, q.float().view(heads, -1, dim).numpy().copy(), cache.k[:, order].float().numpy().copy(),
                                    cache.v[:, order].float().numpy().copy(), dim ** -0.5, read, keep1, keep2))
        return selection


def capture_steps(llm: LLM, prompt: list[int], layer: int, max_tokens: int) -> list[LayerStep]:
    """Decode ``prompt`` greedily on ``llm`` (an engine running MPCache) and return ``layer``'s steps over whole
    level-1 clusters of retained cache."""
    method = llm.engine.runner.decode_hooks
    if not isinstance(method, MPCache):
        raise TypeError("capture_steps needs an LLM built with kv_method='mpcache'")
    recorder = _Recorder(method, layer)
    llm.engine.runner.decode_hooks = recorder
    try:
        llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True), use_tqdm=False)
    finally:
        llm.engine.runner.decode_hooks = method
    return recorder.steps
