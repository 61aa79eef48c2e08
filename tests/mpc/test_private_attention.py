"""Private decoding's attention under SecretFlow SPU against kvtier's plaintext engine: the layer the engine computed
with MPCache (its query, retained cache and the clusters it read; the paper's linearised bound and Quest's exact one),
recomputed under 2PC (semi2k) and 3PC (ABY3), must give the same output within fixed-point error and choose the same
clusters; the full cache likewise; under semi2k at a step that reuses the masks of the cache the first step opened.
The MPC environment is made by scripts/setup_mpc.sh on first use (what .ci/run relies on); the cost figures are
benchmarks/mpcache.py's, not this file's."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from kvtier import LLM
from kvtier.errors import MPCUnavailableError
from kvtier.eval.agreement import text_windows
from kvtier.mpc.capture import capture_steps
from kvtier.mpc.driver import run_mpc
from kvtier.mpc.environment import SETUP, mpc_python
from kvtier.mpc.profile_log import parse_profile, side_by_side

ROOT = Path(__file__).resolve().parents[2]
CONFIG = {"budget": 0.12, "static_keep": 0.5}
LOG = """[info] [api.cc:220] HAL profiling: total time 0.04
[info] [api.cc:223] - f_less, executed 7 times, duration 0.028s, send bytes 3584 recv bytes 3584, send actions 49, recv actions 49
[info] [api.cc:223] - f_mmul, executed 1 times, duration 0.004s, send bytes 1536 recv bytes 1536, send actions 2, recv actions 2
[info] [api.cc:220] MPC profiling: total time 0.04
[info] [api.cc:223] - msb_a2b, executed 7 times, duration 0.02s, send bytes 3584 recv bytes 3584, send actions 49, recv actions 49
[info] [api.cc:233] Link details: total send bytes 5120, recv bytes 5000, send actions 51, recv actions 50
[info] [api.cc:220] HAL profiling: total time 0.04
[info] [api.cc:223] - f_less, executed 7 times, duration 0.028s, send bytes 3500 recv bytes 3584, send actions 48, recv actions 49
[info] [api.cc:223] - f_mmul, executed 1 times, duration 0.004s, send bytes 1500 recv bytes 1536, send actions 3, recv actions 2
[info] [api.cc:233] Link details: total send bytes 5000, recv bytes 5120, send actions 50, recv actions 51
"""


def test_costs_are_summed_over_parties_and_rounds_are_the_busiest_partys():
    cost = parse_profile(LOG, parties=2)
    assert (cost.bytes, cost.rounds) == (10120, 51)
    assert cost.ops == {"f_less": {"bytes": 7084, "rounds": 49}, "f_mmul": {"bytes": 3036, "rounds": 3}}  # HAL ops only, not MPC's
    # the parties dump at once: a header of one among the other's lines changes nothing
    lines = LOG.splitlines(keepends=True)
    interleaved = "".join([lines[0], lines[3], *lines[1:3], *lines[4:]])
    assert parse_profile(interleaved, parties=2).ops == cost.ops
    with pytest.raises(ValueError, match="expected 3 'Link details' lines"):
        parse_profile(LOG, parties=3)
    # two programs on links of their own, run at once (the second with fewer actions): bytes add up, rounds are the busiest's
    quick = parse_profile(LOG.replace("send actions 51", "send actions 20").replace("send actions 50,", "send actions 19,"), parties=2)
    both = side_by_side([cost, quick])
    assert (quick.rounds, both.bytes, both.rounds) == (20, 20240, 51)
    assert both.ops["f_less"] == {"bytes": 2 * 7084, "rounds": 49}


def test_without_the_environment_the_error_says_how_to_make_it(monkeypatch, tmp_path):
    monkeypatch.setenv("KVTIER_MPC_PYTHON", str(tmp_path / "none" / "python"))
    with pytest.raises(MPCUnavailableError, match="setup_mpc.sh"):
        mpc_python()


@pytest.fixture(scope="module")
def mpc_env():
    if "KVTIER_MPC_PYTHON" not in os.environ:
        subprocess.run([str(SETUP)], check=True, timeout=1200)
    return mpc_python()


def layer_steps(bound: str) -> list:
    """kvtier-tiny decoding with MPCache after a 1,200-token prompt of held-out text: layer 2's steps (it selects its
    own clusters; layer 3 reuses them)."""
    llm = LLM("kvtier-tiny", dtype="float32", kv_method="mpcache", kv_method_config={**CONFIG, "bound": bound}, enable_prefix_caching=False)
    prompt = text_windows(llm, 1200, 1, seed=0)[0]
    found = capture_steps(llm, prompt, 2, 40)
    assert found, "no decode step over whole clusters: the test could not run"
    return found


@pytest.mark.parametrize("protocol, bound", [("semi2k", "linear"), ("aby3", "linear"), ("semi2k", "quest")])
def test_mpc_attention_agrees_with_the_engine(mpc_env, protocol, bound):
    step = layer_steps(bound)[0]
    (lo1, hi1), (lo2, hi2) = step.bounds(32), step.bounds(16)
    arrays = {"q": step.q, "k": step.k, "v": step.v, "lo1": lo1, "hi1": hi1, "lo2": lo2, "hi2": hi2}
    params = {"scale": step.scale, "keep1": step.keep1, "keep2": step.keep2, "size": 16, "per": 2, "hierarchy": True, "bound": bound, "alpha": 0.6}
    tasks = [{"protocol": protocol, "kind": "mpcache", "names": list(arrays), "prefix": "", "params": params, "breakdown": True},
             {"protocol": protocol, "kind": "full", "names": ["q", "k", "v"], "prefix": "", "params": params},
             {"protocol": protocol, "kind": "mpcache", "names": list(arrays), "prefix": "", "params": params, "heads_side_by_side": True}]
    results, outputs = run_mpc(tasks, arrays)
    for i in (0, 2):  # MPCache's heads in one program, and side by side
        assert [sorted(row.tolist()) for row in outputs[f"{i}/index"]] == step.read
    for i, full in ((0, False), (1, True), (2, False)):
        want = step.plaintext_attention(16, full=full)
        assert np.abs(outputs[f"{i}/out"] - want).max() / np.abs(want).max() <= 1e-2
    mine, whole = results[0], results[1]
    assert 0 < mine["cost"]["bytes"] < whole["cost"]["bytes"], "reading 12% of a half-evicted cache must send less than reading all of it"
    split = sum(op["bytes"] for op in mine["operators"].values())
    # the operators as separate programs: the fused program's work, plus what crossing program boundaries costs
    # (under ABY3 about 1.6x: a gather whose output leaves its program is reshared and truncated there)
    assert 0.8 <= split / mine["cost"]["bytes"] <= 2.0
    assert 0 < mine["shared_cost"]["bytes"] < mine["cost"]["bytes"], "a layer that shares the selection must skip its cost"
    # the outputs checked above are a later step's, whose products reuse the masks the first step opened (semi2k)
    for result in (mine, whole):
        later, first = result["cost"]["bytes"], result["first_cost"]["bytes"]
        if protocol == "semi2k":
            assert later < 0.7 * first, "a later step must not open the cache's masks again"
        else:  # ABY3's products open no operand: nothing to reuse
            assert abs(later - first) <= 0.05 * first
    # each KV head in a lane of its own: the same work, its top-k no longer waiting on the other heads'. The lanes send
    # 2-4% more (each its own program), and SPU's top-k shuffles before its quickselect, so its comparisons vary a run
    lanes = results[2]
    assert abs(lanes["cost"]["bytes"] - mine["cost"]["bytes"]) <= 0.1 * mine["cost"]["bytes"]
    assert lanes["cost"]["rounds"] < 0.8 * mine["cost"]["rounds"]
