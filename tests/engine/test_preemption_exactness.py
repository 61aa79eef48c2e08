"""Preemption loses nothing: seeded n > 1 requests that arrive while others run, on a pool so small that
requests are preempted hundreds of times (recomputed or swapped, prefix caching on), give exactly the
tokens each gives alone.

Two bugs this caught: admitting a group of sequences could hand one of them a cached block that another
of the group was about to reuse as its prefix, and a copy-on-write decided before a swap-out in the same
step was done after it, so the swapped-out block held stale K/V."""

from __future__ import annotations

import random

import pytest

from kvtier import SamplingParams
from kvtier.config import EngineArgs
from kvtier.engine.llm_engine import LLMEngine


def run_alone(engine: LLMEngine, prompt: list[int], params: SamplingParams) -> list[list[int]]:
    rid = engine.add_request({"prompt_token_ids": prompt}, params)
    while True:
        for out in engine.step():
            if out.request_id == rid and out.finished:
                return [c.token_ids for c in out.outputs]


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_requests_arriving_under_preemption_match_their_solo_tokens(mode):
    # the shipped model: its samples repeat, so sequences share generated blocks too, as real ones do (a random model's never do)
    per_token = 2 * 6 * 4 * 32 * 4  # K+V, layers, KV heads, head_dim, fp32
    engine = LLMEngine(EngineArgs(model="kvtier-tiny", dtype="float32", max_model_len=512, kv_cache_memory=384 * per_token,
                                  preemption_mode=mode, swap_space=384 * per_token / (1 << 30)))
    rng = random.Random(1)
    tok = engine.tokenizer
    questions = ["What does os.path.join do?", "Explain a dict comprehension.", "hi"]
    catalogue = [(tok.encode(tok.apply_chat_template([{"role": "user", "content": rng.choice(questions)}], True), add_special_tokens=False),
                  SamplingParams(n=rng.choice([1, 2, 3]), max_tokens=rng.randint(10, 90), temperature=1.0, seed=rng.randrange(10**9)))
                 for _ in range(16)]
    alone = [run_alone(engine, p, sp) for p, sp in catalogue]
    in_flight: dict[str, int] = {}
    finished = mismatched = 0
    for _ in range(2500):
        while len(in_flight) < 12 and rng.random() < 0.3:
            i = rng.randrange(len(catalogue))
            in_flight[engine.add_request({"prompt_token_ids": catalogue[i][0]}, catalogue[i][1])] = i
        for out in engine.step():
            i = in_flight.pop(out.request_id)
            finished += 1
            mismatched += [c.token_ids for c in out.outputs] != alone[i]
    assert engine.scheduler.num_preemptions > 100 and finished > 100
    assert mismatched == 0, f"{mismatched} of {finished} differ"
