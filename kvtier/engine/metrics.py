"""Counters and gauges of an engine, as one flat dict (names follow vLLM's Prometheus metrics)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvtier.engine.llm_engine import LLMEngine


def kv_waste_slots(engine: LLMEngine) -> int:
    """Slots reserved in live blocks but holding no token, summed over layer groups (a shared block counts once)."""
    waste = 0
    for m in engine.kv.managers:
        if m.spec.bytes_per_token == 0:
            continue  # a Mamba2 state slot holds no tokens, so none of it is waste
        bs = m.block_size
        filled: dict[int, int] = {}
        for req in engine.requests.values():
            for s in req.live_seqs:
                n = len(s.token_ids)
                for i, block in enumerate(m.tables.get(s.seq_id, ())):
                    used = max(0, min(bs, n - i * bs))
                    if block is not None and used > filled.get(block.block_id, -1):
                        filled[block.block_id] = used
        waste += sum(bs - used for used in filled.values())
    return waste


def engine_metrics(engine: LLMEngine, with_waste: bool = True) -> dict[str, float]:
    """Everything in one dict; ``with_waste=False`` skips the one figure that walks every block table. Block counts add
    up the token-holding groups' pools, a hybrid's state slots are counted apart (``mamba_slots_*``); usage weighs
    each group by its bytes."""
    kv, sched, plan = engine.kv, engine.scheduler, engine.memory_plan
    every = [m.pool for m in kv.managers]
    token_groups = [i for i, m in enumerate(kv.managers) if m.spec.bytes_per_token]
    pools = [every[i] for i in token_groups]
    total = sum(p.num_blocks for p in pools)
    used = sum(p.num_blocks - p.num_free for p in pools)
    cached = sum(p.num_cached_unused for p in pools)
    used_bytes = sum((p.num_blocks - p.num_free) * g.bytes_per_block for p, g in zip(every, plan.groups))
    state = [(every[i], kv.managers[i], plan.groups[i]) for i in range(len(every)) if i not in token_groups]
    out = {
        "num_requests_running": len(sched.running),
        "num_requests_waiting": len(sched.waiting),
        "num_requests_swapped": len(sched.swapped),
        "num_preemptions": sched.num_preemptions,
        "prompt_tokens": engine.counters["prompt_tokens"],
        "generation_tokens": engine.counters["generation_tokens"],
        "requests_finished": engine.counters["requests_finished"],
        "requests_aborted": engine.counters["requests_aborted"],
        "prefix_cache_queries": kv.prefix_queries,
        "prefix_cache_hits": kv.prefix_hits,
        "kv_cache_usage_perc": used_bytes / max(1, sum(g.num_blocks * g.bytes_per_block for g in plan.groups)),
        "kv_blocks_total": total,
        "kv_blocks_used": used,
        "kv_blocks_free": sum(p.num_free for p in pools) - cached,
        "kv_blocks_cached": cached,
        "kv_host_blocks_total": sum(kv.managers[i].host_pool.num_blocks for i in token_groups),
        "kv_host_blocks_used": sum(kv.managers[i].host_pool.num_blocks - kv.managers[i].host_pool.num_free for i in token_groups),
        "kv_bytes_per_token": plan.bytes_per_token,
    }
    if state:
        out.update({
            "mamba_slots_total": sum(p.num_blocks for p, _, _ in state),
            "mamba_slots_used": sum(p.num_blocks - p.num_free for p, _, _ in state),
            "mamba_host_slots_used": sum(m.host_pool.num_blocks - m.host_pool.num_free for _, m, _ in state),
            "mamba_bytes_per_slot": sum(g.bytes_per_block for _, _, g in state),
        })
    if with_waste:
        waste = kv_waste_slots(engine)
        out["kv_waste_slots"] = waste
        out["kv_waste_fraction_of_pool"] = waste / (total * kv.block_size)
        out["kv_waste_fraction_of_used"] = waste / max(1, used * kv.block_size)
    return out
