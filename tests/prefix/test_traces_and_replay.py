"""The synthetic traces have the structure the spec gives each workload, and a replay counts hits as the tree allows."""

from __future__ import annotations

from kvtier.prefix.costs import HybridCosts
from kvtier.prefix.radix_tree import Policy
from kvtier.prefix.simulator import ALPHAS, replay
from kvtier.prefix.traces import COLLAPSED, HEADER, KEEP_OBSERVATIONS, PREAMBLE, generate, read_jsonl, write_jsonl

COSTS = HybridCosts.paper_7b()


def sessions(records):
    out = {}
    for r in records:
        out.setdefault(r["session_id"], []).append(r)
    return out


def test_chat_history_is_append_only_and_the_same_seed_gives_the_same_trace(tmp_path):
    records = generate("lmsys", num_sessions=4, sessions_per_s=2.0, seed=3)
    assert records == generate("lmsys", num_sessions=4, sessions_per_s=2.0, seed=3) != generate("lmsys", num_sessions=4, seed=4)
    assert [r["ts"] for r in records] == sorted(r["ts"] for r in records)
    for turns in sessions(records).values():
        assert turns[0]["ts"] == turns[0]["session_id"] / 2.0 and len(turns) >= 10
        for a, b in zip(turns, turns[1:]):
            history = a["input_tokens"] + a["output_tokens"]
            assert b["input_tokens"][: len(history)] == history and b["ts"] > a["ts"]
    assert read_jsonl(write_jsonl(records, tmp_path / "t.jsonl")) == records


def test_swe_sessions_share_the_preamble_and_collapse_old_observations():
    by_session = sessions(generate("swe", num_sessions=6, seed=1))
    firsts = [turns[0]["input_tokens"][:PREAMBLE] for turns in by_session.values()]
    assert all(f == firsts[0] for f in firsts)
    diverged = 0
    for turns in by_session.values():
        for t, (a, b) in enumerate(zip(turns, turns[1:])):
            history = a["input_tokens"] + a["output_tokens"]
            if b["input_tokens"][: len(history)] != history:
                diverged += 1
                assert t + 1 > KEEP_OBSERVATIONS, "history changes only once an observation is old enough to collapse"
    assert diverged > 0 and COLLAPSED < 100


def test_with_room_for_everything_a_chat_turn_reuses_all_of_the_last_one():
    """No eviction: Marconi and SGLang+ admit the same states, so each turn hits exactly the previous turn's input and
    output (the state at the last decoded token), and a session's first turn hits the message header shared by all
    sessions from the third session on (the second branches off there, which admits the header's state); vLLM+ hits
    whole 32-token blocks only."""
    records = generate("sharegpt", num_sessions=4, seed=2)
    last = {}
    expect = []
    for r in records:
        expect.append(last.get(r["session_id"], HEADER if len(last) >= 2 else 0))
        last[r["session_id"]] = r["num_input_tokens"] + r["num_output_tokens"]
    big = 10**15
    marconi, sglang, vllm = (replay(records, COSTS, big, Policy(p)) for p in ("marconi", "sglang+", "vllm+"))
    assert marconi.hit_tokens == sglang.hit_tokens == expect and marconi.evictions == 0
    assert all(h % 32 == 0 and h <= e for h, e in zip(vllm.hit_tokens, expect))
    assert marconi.flops_saved[1] == COSTS.prefill_flops(expect[1])


def test_a_small_cache_evicts_and_tunes_alpha():
    """Alpha is chosen once, when the bootstrap window (here as long again as the requests before the first eviction)
    has passed: the one of the grid whose replay of those requests saves the most FLOPs over their last 500."""
    records = generate("lmsys", num_sessions=8, seed=5)
    r = replay(records, COSTS, 2 * 10**9, Policy("marconi"), tune=True, bootstrap_multiplier=1)
    assert r.evictions > 0 and r.tuned_at is not None
    first_eviction = next(i for i in range(1, len(records)) if replay(records[:i], COSTS, 2 * 10**9, Policy("marconi")).evictions)
    assert r.tuned_at == 2 * first_eviction
    tail = {a: sum(replay(records[: r.tuned_at], COSTS, 2 * 10**9, Policy("marconi", alpha=a)).flops_saved[-500:]) for a in ALPHAS}
    assert tail[r.policy.alpha] == max(tail.values()) and all(tail[a] < tail[r.policy.alpha] for a in ALPHAS if a < r.policy.alpha)
    assert 0 < r.token_hit_rate < 1 and all(h <= n for h, n in zip(r.hit_tokens, r.input_tokens))
