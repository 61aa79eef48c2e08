"""Seeded synthetic traces of the three workloads Marconi is evaluated on (Pan et al., MLSys 2025), as JSONL records
``{session_id, turn_id, ts, num_input_tokens, num_output_tokens, input_tokens, output_tokens}`` (the authors' format).

The paper replays LMSys-Chat-1M, ShareGPT and SWE-agent trajectories; those cannot be downloaded here, so these
generators follow what the spec (../shared/methods/marconi.md, sections 5 and 7) records of them, each parameter
named where it is set. Token ids are drawn at random from a 32,000-token vocabulary (Llama-2's, the paper's
tokenizer), so two sessions share only what the workload shares: a message header in chat, the agent's preamble in
SWE-like sessions.

- ``lmsys`` / ``sharegpt``: multi-turn chat, the input of a turn is the whole history plus the new user message
  (append-only); user turns lognormal (tens to hundreds of tokens); outputs up to thousands (LMSys) or tens to
  hundreds (ShareGPT); a 6-token header opens every message (json.dumps-tokenised messages in the authors' traces);
  the next turn comes after the user types the next message at 1.5 words/s (0.75 words a token).
- ``swe``: an identical 1,244-token agent preamble (a third-party regeneration's) and 200-1,500 tokens of issue text,
  up to 50 turns of actions (100-1,400 tokens) and heavy-tailed observations (10 to thousands); observations older
  than the last five collapse to a short note, so the history changes mid-sequence; Poisson gaps (mean
  ``think_time`` s).

Sessions start at ``i / sessions_per_s``; inputs stop at 32K tokens, as the authors cap them.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator
from pathlib import Path

VOCAB = 32_000
MAX_INPUT = 32_768
WORKLOADS = ("lmsys", "sharegpt", "swe")
HEADER = 6  # tokens opening every chat message (the authors' json.dumps keys)
PREAMBLE = 1_244  # tokens of the SWE agent's shared system prompt
COLLAPSED = 12  # tokens of the note an old observation collapses to (the same note everywhere)
KEEP_OBSERVATIONS = 5
# (median, sigma, low, high) of lognormal token counts
USER_TURN = (60, 0.9, 8, 1_200)
OUTPUT = {"lmsys": (150, 1.1, 21, 1_227), "sharegpt": (200, 0.8, 10, 800)}
ACTION = (300, 0.8, 100, 1_400)
OBSERVATION = (200, 1.3, 10, 8_000)


def _lognormal(rng: random.Random, spec: tuple[float, float, int, int]) -> int:
    median, sigma, lo, hi = spec
    return int(min(hi, max(lo, rng.lognormvariate(math.log(median), sigma))))


def _tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(VOCAB) for _ in range(n)]


def generate(workload: str, num_sessions: int = 100, sessions_per_s: float = 1.0, seed: int = 0, think_time: float = 5.0) -> list[dict]:
    """Every request of ``num_sessions`` sessions, in time order."""
    if workload not in WORKLOADS:
        raise ValueError(f"workload must be one of {', '.join(WORKLOADS)}, got {workload!r}")
    rng = random.Random(seed)
    shared = {"header": _tokens(rng, HEADER), "preamble": _tokens(rng, PREAMBLE), "collapsed": _tokens(rng, COLLAPSED)}
    make = _chat if workload != "swe" else _swe
    out = [r for i in range(num_sessions) for r in make(random.Random(f"{workload}-{seed}-{i}"), workload, i, i / sessions_per_s, shared, think_time)]
    return sorted(out, key=lambda r: (r["ts"], r["session_id"], r["turn_id"]))


def _record(session: int, turn: int, ts: float, prompt: list[int], output: list[int]) -> dict:
    return {"session_id": session, "turn_id": turn, "ts": round(ts, 3), "num_input_tokens": len(prompt), "num_output_tokens": len(output),
            "input_tokens": prompt, "output_tokens": output}


def _chat(rng: random.Random, workload: str, session: int, start: float, shared: dict[str, list[int]], think: float) -> Iterator[dict]:
    header, history = shared["header"], []
    ts = start
    for turn in range(rng.randint(10, 30)):  # sessions of at least 10 turns, as the authors select them
        user = header + _tokens(rng, _lognormal(rng, USER_TURN))
        prompt = history + user
        if len(prompt) > MAX_INPUT:
            return
        output = header + _tokens(rng, _lognormal(rng, OUTPUT[workload]))
        yield _record(session, turn, ts, prompt, output)
        history = prompt + output
        ts += len(user) * 0.75 / 1.5  # typing the next message at 90 words a minute
    return


def _swe(rng: random.Random, workload: str, session: int, start: float, shared: dict[str, list[int]], think: float) -> Iterator[dict]:
    issue = _tokens(rng, rng.randint(200, 1_500))
    steps: list[tuple[list[int], list[int]]] = []  # (action, observation) of every turn so far
    ts = start
    for turn in range(rng.randint(5, 50)):
        kept = len(steps) - KEEP_OBSERVATIONS
        history = [t for i, (action, obs) in enumerate(steps) for t in action + (obs if i >= kept else shared["collapsed"])]
        prompt = shared["preamble"] + issue + history
        if len(prompt) > MAX_INPUT:
            return
        action = _tokens(rng, _lognormal(rng, ACTION))
        yield _record(session, turn, ts, prompt, action)
        steps.append((action, _tokens(rng, _lognormal(rng, OBSERVATION))))
        ts += rng.expovariate(1 / think)
    return


def write_jsonl(records: list[dict], path: str | Path) -> Path:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return Path(path)


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
