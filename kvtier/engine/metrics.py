"""Counters and gauges of an engine, as one flat dict (names follow vLLM's Prometheus metrics)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvtier.engine.llm_engine import LLMEngine


def kv_waste_slots(engine: LLMEngine) -> int:
    """Slots reserved in live blocks but holding no token (a shared block counts once)."""
    bs = engine.kv.block_size
    filled: dict[int, int] = {}
    for req in engine.requests.values():
        for s in req.live_seqs:
            table = engine.kv.tables.get(s.seq_id)
            if not table:
                continue
            n = len(s.token_ids)
            for i, block in enumerate(table):
                used = max(0, min(bs, n - i * bs))
                if used > filled.get(block.block_id, -1):
                    filled[block.block_id] = used
    return sum(bs - used for used in filled.values())


def engine_metrics(engine: LLMEngine, with_waste: bool = True) -> dict[str, float]:
    """Everything in one dict; ``with_waste=False`` skips the one figure that walks every block table."""
    kv, sched, plan = engine.kv, engine.scheduler, engine.memory_plan
    pool = kv.pool
    used = pool.num_blocks - pool.num_free
    pc = kv.prefix_cache
    slots = pool.num_blocks * kv.block_size
    out = {
        "num_requests_running": len(sched.running),
        "num_requests_waiting": len(sched.waiting),
        "num_requests_swapped": len(sched.swapped),
        "num_preemptions": sched.num_preemptions,
        "prompt_tokens": engine.counters["prompt_tokens"],
        "generation_tokens": engine.counters["generation_tokens"],
        "requests_finished": engine.counters["requests_finished"],
        "requests_aborted": engine.counters["requests_aborted"],
        "prefix_cache_queries": pc.queries if pc else 0,
        "prefix_cache_hits": pc.hits if pc else 0,
        "kv_cache_usage_perc": kv.usage(),
        "kv_blocks_total": pool.num_blocks,
        "kv_blocks_used": used,
        "kv_blocks_free": pool.num_free - pool.num_cached_unused,
        "kv_blocks_cached": pool.num_cached_unused,
        "kv_host_blocks_total": kv.host_pool.num_blocks,
        "kv_host_blocks_used": kv.host_pool.num_blocks - kv.host_pool.num_free,
        "kv_bytes_per_token": plan.bytes_per_token,
    }
    if with_waste:
        waste = kv_waste_slots(engine)
        out["kv_waste_slots"] = waste
        out["kv_waste_fraction_of_pool"] = waste / slots
        out["kv_waste_fraction_of_used"] = waste / max(1, used * kv.block_size)
    return out
