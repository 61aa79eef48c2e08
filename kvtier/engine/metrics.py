"""Counters and gauges of an engine, as one flat dict (names follow vLLM's Prometheus metrics)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvtier.cache.block_pool import BlockPool
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
                n = len(s.token_ids) - s.num_evicted
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
    groups = list(zip(kv.managers, plan.groups))
    tokens = [m for m, _ in groups if m.spec.bytes_per_token]
    state = [(m, g) for m, g in groups if not m.spec.bytes_per_token]
    # blocks (slots) a hybrid's prefix cache alone holds count as cached, not used, as block-hash ones do
    tree = kv.state_prefix.cached_blocks() if kv.state_prefix is not None else [0] * len(groups)
    tree_of = {id(m): n for m, n in zip(kv.managers, tree)}
    total = sum(m.pool.num_blocks for m in tokens)
    used = sum(_used(m.pool) - tree_of[id(m)] for m in tokens)
    cached = sum(m.pool.num_cached_unused + tree_of[id(m)] for m in tokens)
    held = sum((_used(m.pool) - tree_of[id(m)]) * g.bytes_per_block for m, g in groups)
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
        "kv_cache_usage_perc": held / max(1, sum(g.num_blocks * g.bytes_per_block for g in plan.groups)),
        "cache_bytes_used": held,  # K/V blocks and state slots in use, every group, on the device
        "kv_blocks_total": total,
        "kv_blocks_used": used,
        "kv_blocks_free": sum(m.pool.num_free - m.pool.num_cached_unused for m in tokens),
        "kv_blocks_cached": cached,
        "kv_host_blocks_total": sum(m.host_pool.num_blocks for m in tokens),
        "kv_host_blocks_used": sum(_used(m.host_pool) for m in tokens),
        "kv_bytes_per_token": plan.bytes_per_token,
        "kv_bytes_read": engine.counters["kv_bytes_read"],  # by decode attention, so far (a KV method's selection counted)
    }
    if state:
        out.update({
            "mamba_slots_total": sum(m.pool.num_blocks for m, _ in state),
            "mamba_slots_used": sum(_used(m.pool) - tree_of[id(m)] for m, _ in state),
            "mamba_slots_cached": sum(tree_of[id(m)] for m, _ in state),
            "mamba_host_slots_used": sum(_used(m.host_pool) for m, _ in state),
            "mamba_bytes_per_slot": sum(g.bytes_per_block for _, g in state),
        })
    if kv.state_prefix is not None:
        tree = kv.state_prefix.tree
        out.update({"prefix_cache_states": tree.num_states, "prefix_cache_evictions": tree.evictions,
                    "prefix_cache_bytes": tree.bytes_used, "prefix_cache_alpha": tree.policy.alpha})
    if with_waste:
        waste = kv_waste_slots(engine)
        out["kv_waste_slots"] = waste
        out["kv_waste_fraction_of_pool"] = waste / (total * kv.block_size)
        out["kv_waste_fraction_of_used"] = waste / max(1, used * kv.block_size)
    return out


def _used(pool: BlockPool) -> int:
    return pool.num_blocks - pool.num_free
