"""MPCache through the engine against a float64 reimplementation of the paper's rules driving transformers on the same
weights: the look-once static eviction after prefill, the two-level cluster selection with the linearised (or Quest's)
bound at every decode step, index sharing between adjacent layers, and the token-level ablation."""

from __future__ import annotations

import math

import pytest
import torch

from kvtier import LLM
from kvtier.errors import InvalidArgumentError
from kvtier.kv_methods.mpcache import MPCache, MPCacheConfig
from tests.engine.test_hf_parity import prompts_of
from tests.hf_checkpoints import save_hf_checkpoint
from tests.kv_methods.test_decode_methods import TOL, attention_reference, run_engine

LAYERS = 5  # layers 0 and 1 select alone, 2 and 3 share, 4 alone


@pytest.fixture(scope="module")
def deep_dir(tmp_path_factory, tokenizer_files):
    """A random GQA Llama (4 heads, 2 KV heads) with five layers, so that one adjacent pair shares its selection."""
    return save_hf_checkpoint(tmp_path_factory.mktemp("llama5"), tokenizer_files, "LlamaForCausalLM", num_hidden_layers=LAYERS, seed=3)


def _cluster_scores(q: torch.Tensor, keys: torch.Tensor, size: int, cfg: MPCacheConfig) -> list[float]:
    """Each run of ``size`` consecutive keys scored for the query heads ``q`` [g, D] (the best of them), written out."""
    scores = []
    for lo in range(0, keys.shape[0], size):
        rmin, rmax = keys[lo : lo + size].amin(0), keys[lo : lo + size].amax(0)
        best = -math.inf
        for head in q:
            if cfg.bound == "linear":
                s = head @ (cfg.alpha * rmax + (1 - cfg.alpha) * rmin)
            else:
                s = torch.maximum(head * rmin, head * rmax).sum()
            best = max(best, s.item())
        scores.append(best)
    return scores


def _top(scores: list[float], count: int) -> set[int]:
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    return {i for i in order[:count] if scores[i] > -math.inf}


def _visible_slots(q: torch.Tensor, keys: torch.Tensor, tokens: int, cfg: MPCacheConfig) -> list[int]:
    """One KV head's decode step: the slots of its retained ``keys`` [slots, D] that the query heads ``q`` read."""
    slots, size = keys.shape[0], cfg.cluster_size2
    have = math.ceil(slots / size)
    want = min(max(math.ceil(cfg.kept(tokens) / size), min(have, 2)), have)
    if want >= have:
        return list(range(slots))
    ends = {0, have - 1}
    if cfg.granularity == "token":
        exact = [max((head @ keys[s]).item() for head in q) for s in range(slots)]
        pinned = set(range(size)) | set(range((slots - 1) // size * size, slots))
        exact = [math.inf if s in pinned else x for s, x in enumerate(exact)]
        return sorted(_top(exact, min(want * size, slots)))
    level2 = _cluster_scores(q, keys, size, cfg)
    if cfg.hierarchy:
        per = cfg.cluster_size1 // size
        have1 = math.ceil(slots / cfg.cluster_size1)
        level1 = _cluster_scores(q, keys, cfg.cluster_size1, cfg)
        level1 = [math.inf if c in (0, have1 - 1) else s for c, s in enumerate(level1)]
        parents = _top(level1, min(have1, max(math.floor(have1 * cfg.ratio1), math.ceil(want / per) + 1)))
        level2 = [s if c // per in parents else -math.inf for c, s in enumerate(level2)]
    level2 = [math.inf if c in ends else s for c, s in enumerate(level2)]
    return [s for c in sorted(_top(level2, want)) for s in range(c * size, min((c + 1) * size, slots))]


def mpcache_attention(cfg: MPCacheConfig, static: dict[int, list[int]]):
    """An eager attention for transformers that runs MPCache in float64, loop by loop. Prefill: causal attention; each
    selecting layer votes (the largest head-mean probability any of the prompt's last 20% of queries gives a token) and
    keeps its best ``static_keep`` of the prompt, the second layer of a pair takes the first's (``static`` records it).
    Decode: per KV head, clusters of consecutive retained tokens (kept prompt, then every decoded token) chosen as the
    paper's two levels choose them, the second layer of a pair reading the first's choice."""
    shares = MPCache(cfg).shares
    chosen: dict[int, list[list[int]]] = {}

    def attend(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        layer = module.layer_idx
        _, heads, q_len, _ = query.shape
        kv_heads, n = key.shape[1], key.shape[2]
        group = heads // kv_heads
        k, v = key[0].repeat_interleave(group, 0), value[0].repeat_interleave(group, 0)
        scores = query[0] @ k.transpose(1, 2) * scaling
        visible = torch.zeros(heads, q_len, n, dtype=torch.bool)
        if q_len > 1:
            visible[:] = torch.arange(n)[None, :] <= torch.arange(n - q_len, n)[:, None]
            probs = scores.masked_fill(~visible, -math.inf).softmax(-1)
            window = max(1, math.floor(n * cfg.window_ratio))
            votes = probs[:, -window:].mean(0).amax(0)
            if shares(layer):
                static[layer] = static[layer - 1]
            else:
                kept = cfg.static_kept(n)
                static[layer] = sorted(votes.topk(kept).indices.tolist()) if kept < n else list(range(n))
            static["prompt"] = n
        else:
            retained = static[layer] + list(range(static["prompt"], n))
            if not shares(layer):
                chosen[layer] = [_visible_slots(query[0, h * group : (h + 1) * group, 0], key[0, h, retained], n, cfg) for h in range(kv_heads)]
            picks = chosen[layer - 1] if shares(layer) else chosen[layer]
            for h in range(kv_heads):
                visible[h * group : (h + 1) * group, 0, [retained[s] for s in picks[h]]] = True
        probs = scores.masked_fill(~visible, -math.inf).softmax(-1)
        return (probs @ v).transpose(0, 1)[None], probs[None]

    return attend


CONFIGS = [
    {"budget": 0.25, "static_keep": 0.6},
    {"budget": 0.2, "static_keep": 0.5, "bound": "quest"},
    {"budget": 0.2, "static_keep": 0.7, "hierarchy": False},
    {"budget": 40, "static_keep": 0.5, "share_layers": False, "alpha": 0.9},
    {"budget": 0.2, "static_keep": 0.6, "granularity": "token"},
    {"budget": 0.15, "static_keep": 0.5, "cluster_size1": 64, "cluster_size2": 32, "ratio1": 0.3},
]


@pytest.mark.parametrize("config", CONFIGS)
def test_mpcache_evicts_and_reads_what_a_float64_reference_does(deep_dir, config):
    """The prompt positions each layer keeps after prefill (one set for every KV head, the second layer of a pair copying
    the first's) and the logits of every decode step equal the reference's."""
    prompt = prompts_of([230], 512, seed=31)[0]
    tokens, mine, cuts = run_engine(deep_dir, prompt, 40, kv_method="mpcache", kv_method_config=config)
    static: dict = {}
    expect = attention_reference(deep_dir, prompt, tokens, f"mpcache_reference_{CONFIGS.index(config)}",
                                 mpcache_attention(MPCacheConfig(**config), static))
    assert len(cuts) == 1 and cuts[0][0] == len(prompt), "one look-once eviction, after prefill"
    kept = cuts[0][1]  # [layers, kv_heads, n]
    for layer in range(LAYERS):
        for head in range(kept.shape[1]):
            assert kept[layer, head].tolist() == static[layer]
    assert torch.equal(kept[3], kept[2]) and not torch.equal(kept[1], kept[0]) or not config.get("share_layers", True)
    assert (mine - expect).abs().max().item() <= TOL
    _, full, _ = run_engine(deep_dir, prompt, 40)
    assert (full[1:] - mine[1:]).abs().max().item() > 1e-3, "the method changed nothing: the test could not fail"


def test_a_budget_of_the_whole_context_is_the_full_cache(deep_dir):
    prompt = prompts_of([200], 512, seed=32)[0]
    tokens, mine, cuts = run_engine(deep_dir, prompt, 24, kv_method="mpcache", kv_method_config={"budget": 1.0})
    full_tokens, full, _ = run_engine(deep_dir, prompt, 24)
    assert cuts == [] and tokens == full_tokens
    assert (mine - full).abs().max().item() <= 1e-5


def test_gamma_keeps_every_token_some_window_query_attends_to_above_it(deep_dir):
    """A threshold instead of a ratio: each layer keeps as many prompt tokens as the layer with the most votes >= gamma,
    (never fewer than the budget); a tiny gamma keeps the whole prompt."""
    prompt = prompts_of([180], 512, seed=33)[0]
    _, _, cuts = run_engine(deep_dir, prompt, 4, kv_method="mpcache", kv_method_config={"budget": 0.1, "gamma": 1e-9})
    assert cuts == []
    _, _, cuts = run_engine(deep_dir, prompt, 4, kv_method="mpcache", kv_method_config={"budget": 0.1, "gamma": 0.05})
    kept = cuts[0][1].shape[-1]
    assert MPCacheConfig(budget=0.1).kept(len(prompt)) <= kept < len(prompt)


@pytest.mark.parametrize("config, field", [
    ({"static_keep": 0.3, "gamma": 0.01}, "kv_method_config.gamma"),
    ({"static_keep": 0}, "kv_method_config.static_keep"),
    ({"alpha": 1.5}, "kv_method_config.alpha"),
    ({"window_ratio": -0.1}, "kv_method_config.window_ratio"),
    ({"ratio1": 0}, "kv_method_config.ratio1"),
    ({"cluster_size1": 40}, "kv_method_config.cluster_size1"),
    ({"cluster_size2": 0}, "kv_method_config.cluster_size2"),
    ({"hierarchy": "no"}, "kv_method_config.hierarchy"),
    ({"bound": "exact"}, "kv_method_config.bound"),
    ({"granularity": "page"}, "kv_method_config.granularity"),
    ({"budget": 0}, "kv_method_config.budget"),
])
def test_bad_config_names_its_key(config, field):
    with pytest.raises(InvalidArgumentError) as e:
        LLM("kvtier-tiny", kv_method="mpcache", kv_method_config=config)
    assert e.value.field == field


def test_clusters_must_be_whole_blocks(llama_dir):
    with pytest.raises(InvalidArgumentError) as e:
        LLM(str(llama_dir), block_size=32, kv_method="mpcache", kv_method_config={"cluster_size1": 32, "cluster_size2": 16})
    assert e.value.field == "kv_method_config.cluster_size2" and "block_size (32)" in e.value.message


def test_rows_read_count_representatives_then_the_chosen_tokens():
    """Hand-worked at 1,024 retained slots of 1,100 tokens, budget 0.12 (132 tokens: 9 clusters of 16): the linear bound
    scores 32 large clusters and the 32 halves of max(16, ceil(9 / 2) + 1) = 16 kept ones, then reads
    9 x 16 = 144 tokens; Quest's bound needs a min and a max per cluster; without the hierarchy all 64 small clusters are
    scored; the token ablation reads every K row."""
    rows = lambda **kw: MPCache(MPCacheConfig(budget=0.12, **kw)).rows_read(1024, 1100, 16, 2)  # noqa: E731
    assert rows() == (32 + 32 + 144, 144)
    assert rows(bound="quest") == (2 * 64 + 144, 144)
    assert rows(hierarchy=False) == (64 + 144, 144)
    assert rows(granularity="token") == (1024, 144)
    assert MPCache(MPCacheConfig(budget=0.5)).rows_read(64, 64, 16, 2) == (2 + 2 * 2 + 32, 32)  # 2 of 4 clusters: both parents kept
    assert MPCache(MPCacheConfig(budget=1.0)).rows_read(64, 64, 16, 2) == (64, 64)
