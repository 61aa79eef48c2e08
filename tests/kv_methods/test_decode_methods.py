"""The methods that act during decode (H2O: accumulated attention, eviction as the cache grows; Quest: per-head block
selection from key bounds) through the engine, against float64 reimplementations of the papers' rules driving
transformers on the same weights, and what they keep beside K and V surviving preemption by swap and recompute."""

from __future__ import annotations

import math

import pytest
import torch
import transformers

from kvtier import LLM, SamplingParams
from kvtier.engine.compression import Compression
from kvtier.kv_methods.base import KVMethodConfig
from tests.engine.test_hf_parity import LogitSpy, prompts_of
from tests.hf_checkpoints import save_hf_checkpoint

TOL = 1e-4
BLOCK = 16
KV_BLOCK = BLOCK * 2 * 2 * 2 * 16 * 4  # bytes: tokens x (K, V) x layers x KV heads x head_dim x fp32


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tokenizer_files):
    """A random GQA Llama (4 heads, 2 KV heads, 2 layers), fp32, built by transformers."""
    return save_hf_checkpoint(tmp_path_factory.mktemp("llama"), tokenizer_files, "LlamaForCausalLM")


def run_engine(path, prompt, max_tokens, **engine_kw):
    """Greedy tokens, the logits each came from, and every compaction as (tokens computed, kept positions [layers, kv_heads, n])."""
    llm = LLM(str(path), dtype="float32", kv_cache_memory=1 << 22, **engine_kw)
    spy, evictions = LogitSpy(llm), []
    noted = Compression._evicted

    def record(self, seq, keep):
        noted(self, seq, keep)
        evictions.append((seq.num_computed_tokens, seq.slot_positions.clone()))

    Compression._evicted = record
    try:
        out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True), use_tqdm=False)[0]
    finally:
        Compression._evicted = noted
    (logits,) = spy.by_seq.values()
    return out.outputs[0].token_ids, torch.stack(logits), evictions


def group_sum(attn: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[heads, ..., keys] -> [kv_heads, keys]: summed over the query heads of each KV head and every query."""
    return attn.reshape(kv_heads, -1, attn.shape[-1]).sum(1)


def h2o_choice(scores: torch.Tensor, kept: int, recent_fraction: float) -> torch.Tensor:
    """H2O's rule on [kv_heads, n] scores, written out: the last ``recent`` slots and the best ``kept - recent`` others."""
    n, recent = scores.shape[-1], int(kept * recent_fraction)
    rows = []
    for head in scores:
        order = sorted(range(n - recent), key=lambda i: -head[i].item())[: kept - recent]
        rows.append(sorted(order) + list(range(n - recent, n)))
    return torch.tensor(rows)


@torch.no_grad()
def h2o_reference(path, prompt, tokens, budget, recent_fraction, normalize):
    """transformers (eager attention, float64) fed the prompt, then ``tokens`` one at a time, its cache cut by H2O's rule:
    the prompt to the budget once prefilled, then back to the budget whenever it has grown a block past it (ranking by
    the attention received, or with ``normalize`` by its mean over the queries that saw each token). Returns the logits
    and every cut as (tokens computed, kept positions)."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64, attn_implementation="eager").eval()
    kv_heads = hf.config.num_key_value_heads
    cfg = KVMethodConfig(budget=budget)
    out = hf(torch.tensor([prompt]), use_cache=True, output_attentions=True)
    cache, logits, cuts = out.past_key_values, [out.logits[0, -1]], []
    scores = [group_sum(a[0], kv_heads) for a in out.attentions]
    positions = [torch.arange(len(prompt)).expand(kv_heads, -1) for _ in scores]

    def cut(kept: int, n: int) -> None:
        heads = torch.arange(kv_heads)[:, None]
        for i, layer in enumerate(cache.layers):
            keep = h2o_choice(scores[i] / (n - positions[i]) if normalize else scores[i], kept, recent_fraction)
            layer.keys, layer.values = layer.keys[:, heads, keep], layer.values[:, heads, keep]
            scores[i], positions[i] = scores[i].gather(1, keep), positions[i].gather(1, keep)

    if cfg.kept(len(prompt)) < len(prompt):
        cut(cfg.kept(len(prompt)), len(prompt))
        cuts.append((len(prompt), torch.stack(positions)))
    for i, t in enumerate(tokens[:-1]):
        n = len(prompt) + i + 1
        out = hf(torch.tensor([[t]]), position_ids=torch.tensor([[n - 1]]), past_key_values=cache, use_cache=True, output_attentions=True)
        logits.append(out.logits[0, -1])
        for layer, a in enumerate(out.attentions):
            scores[layer] = torch.cat([scores[layer], torch.zeros(kv_heads, 1, dtype=scores[layer].dtype)], 1) + group_sum(a[0], kv_heads)
            positions[layer] = torch.cat([positions[layer], torch.full((kv_heads, 1), n - 1)], 1)
        if scores[0].shape[-1] >= cfg.kept(n) + BLOCK:
            cut(cfg.kept(n), n)
            cuts.append((n, torch.stack(positions)))
    return torch.stack(logits).float(), cuts


@pytest.mark.parametrize("config", [{"budget": 0.25}, {"budget": 40, "recent_fraction": 0.25}, {"budget": 0.5, "recent_fraction": 1.0},
                                    {"budget": 0.3, "recent_fraction": 0.0, "normalize": True}])
def test_h2o_keeps_and_scores_what_a_float64_reference_does(llama_dir, config):
    """The engine's kept positions at every cut (prompt, then decode) and its logits equal the reference's."""
    prompt = prompts_of([90], 512, seed=21)[0]
    tokens, mine, cuts = run_engine(llama_dir, prompt, 48, kv_method="h2o", kv_method_config=config)
    expect, ref_cuts = h2o_reference(llama_dir, prompt, tokens, config["budget"], config.get("recent_fraction", 0.5), config.get("normalize", False))
    assert len(cuts) >= 2, "the test needs evictions during decode"
    assert [n for n, _ in cuts] == [n for n, _ in ref_cuts]
    for (_, got), (_, want) in zip(cuts, ref_cuts):
        assert torch.equal(got, want)
    assert (mine - expect).abs().max().item() <= TOL
    full_tokens, full, _ = run_engine(llama_dir, prompt, 48)
    assert (full - mine).abs().max().item() > 1e-3, "eviction changed nothing: the test could not fail"


def quest_attention(budget, dense_layers=0):
    """An eager attention for transformers that decodes as Quest does, written from the paper in float64: per KV head,
    blocks of 16 keys scored by sum_d max(q_d min_d, q_d max_d) (the highest over the group's query heads), the last
    block always read, the best blocks holding ``budget`` tokens read; a prompt, and every query of the first
    ``dense_layers`` layers, attends causally to everything."""
    cfg = KVMethodConfig(budget=budget)

    def attend(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        _, heads, q_len, dim = query.shape
        kv_heads, n = key.shape[1], key.shape[2]
        group = heads // kv_heads
        k, v = key[0].repeat_interleave(group, 0), value[0].repeat_interleave(group, 0)  # [heads, n, D]
        scores = query[0] @ k.transpose(1, 2) * scaling
        visible = torch.ones(heads, q_len, n, dtype=torch.bool)
        if q_len > 1:
            visible &= torch.arange(n)[None, :] <= torch.arange(n - q_len, n)[:, None]
        elif module.layer_idx >= dense_layers:
            blocks, want = math.ceil(n / BLOCK), min(math.ceil(cfg.kept(n) / BLOCK), math.ceil(n / BLOCK))
            if want < blocks:
                for h in range(kv_heads):
                    bound = torch.full((blocks,), -math.inf, dtype=torch.float64)
                    for b in range(blocks):
                        keys = key[0, h, b * BLOCK : (b + 1) * BLOCK]
                        lo, hi = keys.amin(0), keys.amax(0)
                        for g in range(group):
                            q = query[0, h * group + g, 0]
                            bound[b] = max(bound[b].item(), torch.maximum(q * lo, q * hi).sum().item())
                    bound[blocks - 1] = math.inf
                    chosen = bound.topk(want).indices
                    allowed = torch.zeros(n, dtype=torch.bool)
                    for b in chosen.tolist():
                        allowed[b * BLOCK : (b + 1) * BLOCK] = True
                    visible[h * group : (h + 1) * group, 0] = allowed
        probs = scores.masked_fill(~visible, -math.inf).softmax(-1)
        return (probs @ v).transpose(0, 1)[None], probs[None]

    return attend


@torch.no_grad()
def attention_reference(path, prompt, tokens, name, attention):
    """transformers in float64 with ``attention`` as its attention function, fed the prompt, then ``tokens`` one decode step
    each: the logits before each token."""
    transformers.AttentionInterface.register(name, attention)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64, attn_implementation=name).eval()
    out = hf(torch.tensor([prompt]), use_cache=True)
    cache, logits = out.past_key_values, [out.logits[0, -1]]
    for i, t in enumerate(tokens[:-1]):
        out = hf(torch.tensor([[t]]), position_ids=torch.tensor([[len(prompt) + i]]), past_key_values=cache, use_cache=True)
        logits.append(out.logits[0, -1])
    return torch.stack(logits).float()


@pytest.mark.parametrize("budget, dense_layers", [(0.25, 0), (40, 0), (0.25, 1)])
def test_quest_reads_the_blocks_a_float64_reference_chooses(llama_dir, budget, dense_layers):
    prompt = prompts_of([150], 512, seed=22)[0]
    tokens, mine, cuts = run_engine(llama_dir, prompt, 24, kv_method="quest", kv_method_config={"budget": budget, "dense_layers": dense_layers})
    assert cuts == [], "Quest evicts nothing"
    expect = attention_reference(llama_dir, prompt, tokens, f"quest_reference_{dense_layers}", quest_attention(budget, dense_layers))
    assert (mine - expect).abs().max().item() <= TOL
    full_tokens, full, _ = run_engine(llama_dir, prompt, 24)
    assert (full[1:] - mine[1:]).abs().max().item() > 1e-3, "the selection changed nothing: the test could not fail"


@pytest.mark.parametrize("method, blocks", [("h2o", 20), ("quest", 12)])
def test_what_a_method_keeps_beside_k_and_v_survives_swapping(llama_dir, method, blocks):
    """A pool too small for all six requests at once: some are swapped out and back in (their blocks with H2O's scores or
    Quest's key bounds); each output equals the one it gets alone."""
    prompts = prompts_of([90, 70, 100, 80, 95, 60], 512, seed=23)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    kw = dict(dtype="float32", kv_method=method, kv_method_config={"budget": 0.4})
    alone = [LLM(str(llama_dir), kv_cache_memory=1 << 22, **kw).generate({"prompt_token_ids": p}, params, use_tqdm=False)[0] for p in prompts]
    tight = LLM(str(llama_dir), kv_cache_memory=blocks * KV_BLOCK, preemption_mode="swap", swap_space=0.01, **kw)
    together = tight.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert tight.get_metrics()["num_preemptions"] > 0
    assert [o.outputs[0].token_ids for o in together] == [o.outputs[0].token_ids for o in alone]
    assert tight.get_metrics()["kv_blocks_used"] == 0


def test_quest_key_bounds_follow_every_block_through_recompute(llama_dir):
    """Preemption by recompute frees blocks that other sequences then fill: after every step each running sequence's
    blocks hold the min and max of exactly the keys in them. (Recomputed outputs may differ from a run alone: the
    recompute prefill attends to every block, where the decode steps it replaces read Quest's choice.)"""
    llm = LLM(str(llama_dir), dtype="float32", kv_cache_memory=12 * KV_BLOCK, kv_method="quest", kv_method_config={"budget": 0.4})
    engine = llm.engine
    for i, p in enumerate(prompts_of([90, 70, 100, 80, 95, 60], 512, seed=23)):
        engine.add_request({"prompt_token_ids": p}, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), str(i))
    checked = 0
    while engine.has_unfinished_requests():
        engine.step()
        for req in engine.scheduler.running:
            for seq in req.live_seqs:
                table = engine.kv.block_ids(seq.seq_id)[0]
                for layer in engine.runner.kv_caches:
                    for b, block in enumerate(table[: -(-seq.num_computed_tokens // BLOCK)]):
                        n = min(BLOCK, seq.num_computed_tokens - b * BLOCK)
                        keys = layer.k[:, block * BLOCK : block * BLOCK + n]
                        assert torch.equal(layer.block_summary[:, block, 0], keys.amin(1))
                        assert torch.equal(layer.block_summary[:, block, 1], keys.amax(1))
                        checked += 1
    assert llm.get_metrics()["num_preemptions"] > 0 and checked > 1000
    assert llm.get_metrics()["kv_blocks_used"] == 0


def test_decode_reads_are_accounted_by_what_the_method_reads(llama_dir):
    """``kv_bytes_read`` adds, per decode token, the K and V rows its attention reads times 256 bytes (one row: 2 layers,
    2 KV heads, head_dim 16, fp32): every cached token's K and V with the full cache; with Quest at 32 tokens, the K
    and V of two blocks, plus each block's min and max (a K row each); with KCache at 32, every K row and 32 V rows for
    each of the 2 query heads a KV head serves (or 32 once, with one choice per KV head)."""
    prompt = prompts_of([150], 512, seed=24)[0]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    contexts = range(151, 170)  # the 19 decode steps after the token the prefill samples, each with its own token cached
    for method, config, rows in (("none", None, lambda n: 2 * n), ("quest", {"budget": 32}, lambda n: 2 * 32 + 2 * math.ceil(n / BLOCK)),
                                 ("kcache", {"top_n": 32}, lambda n: n + 2 * 32), ("kcache", {"top_n": 32, "per_kv_head": True}, lambda n: n + 32)):
        llm = LLM(str(llama_dir), dtype="float32", kv_cache_memory=1 << 22, kv_method=method, kv_method_config=config)
        llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)
        assert llm.get_metrics()["kv_bytes_read"] == 256 * sum(rows(n) for n in contexts), (method, config)
