"""The MPC side of kvtier's private decoding: runs in the MPC environment (made by scripts/setup_mpc.sh), started by
kvtier.mpc.driver in a subprocess with a job file, and answers with a result file. Every party of the protocol runs in
its own thread over SPU's in-memory links; each one profiles its own traffic, and the cost of a program is read from
those counters (kvtier.mpc.profile_log), never from formulas.

    python spu_worker.py JOB.json     # writes the paths in the job's "result" and "outputs"
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # the sibling modules, without kvtier's package (it needs torch)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import spu.libspu as libspu  # noqa: E402
import spu.utils.frontend as spu_fe  # noqa: E402
from profile_log import Cost, parse_profile, side_by_side  # noqa: E402
from spu import api as spu_api  # noqa: E402
from spu_generate import generate_job  # noqa: E402
from spu_programs import (  # noqa: E402
    Bound,
    Plan,
    attention,
    attention_stages,
    fixed,
    mpcache_attention,
    mpcache_stages,
    one_hot_by_bits,
    select,
    sparse_attention,
)

PROTOCOLS = {"semi2k": (libspu.ProtocolKind.SEMI2K, 2), "cheetah": (libspu.ProtocolKind.CHEETAH, 2), "aby3": (libspu.ProtocolKind.ABY3, 3)}
LIBC = ctypes.CDLL(None)
# SPU's exp is (1 + x / 2^n)^(2^n): its default n = 8 is 3% off at exp(-4), which moves a long context's attention output
# by 1%; n = 12 is 0.2% off, and needs 22 fraction bits to keep x / 2^n precise near 0 (18 bits: 1% off there).
FRACTION_BITS = 22
EXP_ITERS = 12


@dataclass
class Secret:
    """A secret-shared value held by the parties: one share per party, and its shape and dtype (for compiling)."""

    shares: list
    shape: tuple[int, ...]
    dtype: np.dtype
    name: str | None = None  # set while the value stays in the parties' runtimes between programs (``Parties.keep``)
    lane: int = 0  # the runtimes that hold it (``Parties`` with lanes)


class Parties:
    """A protocol's parties, one thread and one persistent SPU runtime each, every one profiling its own link. Values
    stay secret-shared between programs; only what the caller reveals is reconstructed. With ``lanes`` > 1 every party
    holds that many runtimes, each over links of its own (what MPCache's top-k gets by forking SPU's link context per
    head): programs in different lanes share no link and no value, so a deployment runs them at once; here they run
    one after another (with 24 SPU 0.9.5 runtimes running at once, one process garbled its log and another its
    heap), each counted on its own, and ``side_by_side`` adds up their bytes and keeps the busiest lane's rounds."""

    created = 0  # instances so far: each one's links get ids of their own

    def __init__(self, protocol: str, fraction_bits: int = FRACTION_BITS, lanes: int = 1) -> None:
        kind, self.size = PROTOCOLS[protocol]
        self.config = libspu.RuntimeConfig(protocol=kind, field=libspu.FieldType.FM64, fxp_fraction_bits=fraction_bits)
        self.config.fxp_exp_iters = EXP_ITERS
        self.config.enable_hal_profile = True
        self.config.enable_pphlo_profile = True
        self.io = spu_api.Io(self.size, self.config)
        Parties.created += 1
        self.runtimes = [self._start(lane) for lane in range(lanes)]
        self.programs = 0
        self.kept = 0

    def _start(self, lane: int) -> list:
        """Every party's runtime of ``lane``, over in-memory links found by an id of their own."""
        desc = libspu.link.Desc()
        desc.id = f"parties{Parties.created}-lane{lane}"
        for rank in range(self.size):
            desc.add_party(f"id_{rank}", f"thread_{rank}")
        runtimes: list = [None] * self.size
        self._each(lambda rank: runtimes.__setitem__(rank, spu_api.Runtime(libspu.link.create_mem(desc, rank), libspu.RuntimeConfig(self.config))))
        return runtimes

    def _each(self, work) -> None:
        errors: list[BaseException] = []

        def party(rank: int) -> None:
            try:
                work(rank)
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                errors.append(e)

        threads = [threading.Thread(target=party, args=(rank,)) for rank in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]

    def share(self, value: np.ndarray) -> Secret:
        value = np.asarray(value)
        return Secret(self.io.make_shares(value, libspu.Visibility.VIS_SECRET), value.shape, value.dtype)

    def keep(self, value: np.ndarray, lane: int = 0, name: str | None = None) -> Secret:
        """``value`` shared once and held in ``lane`` (``hold``). Values kept under one ``name`` in several lanes are read
        by one compiled program there."""
        return self.hold(self.share(value), lane, name)

    def hold(self, value: Secret, lane: int = 0, name: str | None = None) -> Secret:
        """``value`` left in every party's runtime of ``lane``, so the programs that read it see the same buffer: what
        SPU's Beaver cache needs to reuse a ``fixed`` value's mask from one program to the next."""
        name = name or self.fresh_name()
        for rank in range(self.size):
            self.runtimes[lane][rank].set_var(name, value.shares[rank])
        return Secret(value.shares, value.shape, value.dtype, name, lane)

    def fresh_name(self) -> str:
        self.kept += 1
        return f"kept{self.kept}"

    def reveal(self, value: Secret) -> np.ndarray:
        return self.io.reconstruct(list(value.shares))

    def run(self, fn, args: list) -> tuple[list[Secret], Cost, float]:
        """``fn`` on ``args`` (secrets, or arrays the caller shares first): its outputs, still shared, what the run cost
        by SPU's counters, and its seconds."""
        (outs,), cost, seconds = self.run_lanes(fn, [args])
        return outs, cost, seconds

    def run_lanes(self, fn, lane_args: list[list]) -> tuple[list[list[Secret]], Cost, float]:
        """``fn`` in lanes 0, 1, ... on each lane's ``args`` (of equal shapes; a kept secret must live in its lane): every
        lane's outputs, their cost side by side, and the seconds of them all."""
        lane_args = [[a if isinstance(a, Secret) else self.share(a) for a in args] for args in lane_args]
        for lane, args in enumerate(lane_args):
            if any(a.name is not None and a.lane != lane for a in args):
                raise ValueError(f"a kept value passed to lane {lane} lives in another lane")
        self.programs += 1
        first = lane_args[0]
        names = [a.name or f"p{self.programs}_in{i}" for i, a in enumerate(first)]
        examples = [np.zeros(a.shape, a.dtype) for a in first]
        executable, _ = spu_fe.compile(spu_fe.Kind.JAX, fn, examples, {}, names, [libspu.Visibility.VIS_SECRET] * len(first),
                                       lambda outs: [f"p{self.programs}_out{i}" for i in range(len(outs))])
        shapes = jax.tree_util.tree_leaves(jax.eval_shape(fn, *examples))
        runs = [self._run_in(lane, executable, names, shapes, args) for lane, args in enumerate(lane_args)]
        return [outs for outs, _, _ in runs], side_by_side([cost for _, cost, _ in runs]), sum(seconds for _, _, seconds in runs)

    def _run_in(self, lane: int, executable, names: list[str], shapes: list, args: list[Secret]) -> tuple[list[Secret], Cost, float]:
        """One compiled program in ``lane``'s runtimes: its outputs, cost and seconds."""
        results: list = [None] * self.size

        def party(rank: int) -> None:
            rt = self.runtimes[lane][rank]
            passed = [(name, a) for name, a in zip(names, args) if a.name is None]  # kept values are already there
            for name, a in passed:
                rt.set_var(name, a.shares[rank])
            rt.run(executable)
            results[rank] = [rt.get_var(n) for n in executable.output_names]
            for name in [*(name for name, _ in passed), *executable.output_names]:
                rt.del_var(name)

        text, seconds = self._captured(party)
        outs = [Secret(list(parts), tuple(sd.shape), np.dtype(sd.dtype), lane=lane) for parts, sd in zip(zip(*results), shapes)]
        return outs, parse_profile(text, self.size), seconds

    def _captured(self, work) -> tuple[str, float]:
        """``work`` in every party's thread, and what SPU logged meanwhile (its profile), with the seconds it took."""
        with tempfile.TemporaryFile(mode="w+") as log:
            started = time.perf_counter()
            saved = os.dup(1)
            sys.stdout.flush()
            os.dup2(log.fileno(), 1)  # SPU's C++ logger writes the profile to file descriptor 1
            try:
                self._each(work)
            finally:
                LIBC.fflush(None)
                os.dup2(saved, 1)
                os.close(saved)
            seconds = time.perf_counter() - started
            log.seek(0)
            return log.read(), seconds


@dataclass
class Split:
    """A value cut along its first axis (the KV heads), part h secret-shared in lane h."""

    parts: list[Secret]


class HeadLanes:
    """The parties running every program once per KV head, head h in lane h, the heads side by side: rounds of one
    head, bytes of all. Attention is independent across KV heads, and so is MPCache's selection; SPU's secret top-k runs a
    batch's rows one after another, which this turns into the side-by-side top-k of MPCache's own ``rank.cc``.
    The interface of ``Parties`` (``keep``, ``run``, ``reveal``) over ``Split`` values."""

    def __init__(self, parties: Parties) -> None:
        self.parties = parties
        self.heads = len(parties.runtimes)

    def keep(self, value: np.ndarray) -> Split:
        name = self.parties.fresh_name()
        return Split([self.parties.keep(value[h:h + 1], h, name) for h in range(self.heads)])

    def run(self, fn, args: list) -> tuple[list[Split], Cost, float]:
        lane_args = [[a.parts[h] if isinstance(a, Split) else np.asarray(a)[h:h + 1] for a in args] for h in range(self.heads)]
        outs, cost, seconds = self.parties.run_lanes(fn, lane_args)
        return [Split(list(parts)) for parts in zip(*outs)], cost, seconds

    def reveal(self, value: Split) -> np.ndarray:
        return np.concatenate([self.parties.reveal(part) for part in value.parts])


def run_stages(parties: Parties, stages, values: dict[str, np.ndarray]) -> dict[str, dict]:
    """Each stage as its own program on secret inputs; costs summed per operator class."""
    costs: dict[str, dict] = {}
    for stage in stages:
        outs, cost, seconds = parties.run(stage.fn, [values[n] for n in stage.inputs])
        values.update(zip(stage.outputs, outs))  # still secret: the next operator reads the shares
        mine = costs.setdefault(stage.name, {"bytes": 0, "rounds": 0, "seconds": 0.0})
        mine["bytes"] += cost.bytes
        mine["rounds"] += cost.rounds
        mine["seconds"] += seconds
    return costs


def plan_of(params: dict, protocol: str) -> Plan:
    """A job's MPCache parameters (kvtier's public counts) as the programs' plan."""
    return Plan(params["keep1"], params["keep2"], params["size"], params["per"], Bound(params.get("bound", "linear"), params.get("alpha", 0.6)),
                params["hierarchy"], one_hot_by_bits(protocol))


def twice(parties: Parties, fn, args: list) -> tuple[list[Secret], Cost, Cost, float, list[Secret]]:
    """``fn`` run two times on the same inputs, arrays among them shared once and kept in the runtimes: the first run
    is a step whose cache the parties have not opened yet (under semi2k it opens the masks of the ``fixed`` values), the
    second a later step's (it reuses them). The second run's outputs, both costs, its seconds, and the inputs as kept."""
    kept = [parties.keep(a) if isinstance(a, np.ndarray) else a for a in args]
    _, first, _ = parties.run(fn, kept)
    outs, again, seconds = parties.run(fn, kept)
    return outs, first, again, seconds, kept


def attention_job(parties: Parties | HeadLanes, job: dict, arrays: dict[str, np.ndarray]) -> tuple[dict, dict[str, np.ndarray]]:
    """One layer's attention for one decode query, full-cache or MPCache, the cache and its bounds ``fixed``: the fused
    program's outputs and its cost at a later step (``cost``: the masks of the cache reused) and at the first
    (``first_cost``); for MPCache also the cost of a layer that shares the selection (``shared_cost``,
    ``first_shared_cost``); with ``breakdown`` each operator run on its own at a later step
    (attribution: programs cut apart cost more than the fused one, which is what a step runs)."""
    p = job["params"]
    scale, kind = p["scale"], job["kind"]
    q, v = arrays["q"], arrays["v"]
    k = np.ascontiguousarray(arrays["k"].transpose(0, 2, 1))  # the programs' layouts: keys and bounds transposed
    extra: dict = {}
    if kind == "full":
        (out,), first, cost, seconds, kept = twice(parties, lambda q, k, v: attention(q, [fixed(k)], [fixed(v)], scale), [q, k, v])
        outputs = {"out": parties.reveal(out)}
        stages = attention_stages(scale)
    else:
        plan = plan_of(p, job["protocol"])
        bounds = [np.ascontiguousarray(arrays[n].transpose(0, 2, 1)) for n in ("lo1", "hi1", "lo2", "hi2")]
        (out, index), first, cost, seconds, kept = twice(
            parties, lambda q, k, v, *b: mpcache_attention(q, fixed(k), fixed(v), *map(fixed, b), scale, plan), [q, k, v, *bounds])
        outputs = {"out": parties.reveal(out), "index": parties.reveal(index)}
        stages = mpcache_stages(scale, plan)
        kept_q, _, _, *kept_bounds = kept
        (onehot, _), _, _ = parties.run(lambda q, *b: select(q, *map(fixed, b), plan), [kept_q, *kept_bounds])
        # a layer that shares its neighbour's selection: attention over the clusters its one-hot rows choose
        _, shared_first, shared, _, _ = twice(parties, lambda onehot, q, k, v: sparse_attention(q, [fixed(k)], [fixed(v)], onehot, plan.size, scale),
                                              [onehot, q, k, v])
        extra["shared_cost"], extra["first_shared_cost"] = shared.as_dict(), shared_first.as_dict()
    result = {"cost": cost.as_dict(), "first_cost": first.as_dict(), "seconds": seconds, **extra}
    if job.get("breakdown"):
        names = ["q", "k", "v"] if kind == "full" else ["q", "k", "v", "lo1", "hi1", "lo2", "hi2"]
        result["operators"] = run_stages(parties, stages, dict(zip(names, kept)))
    return result, outputs


def main(argv: list[str]) -> int:
    job = json.loads(Path(argv[0]).read_text())
    arrays = dict(np.load(job["inputs"])) if job.get("inputs") else {}
    results, outputs = [], {}
    for i, task in enumerate(job["tasks"]):
        if task.get("random"):  # cost needs no trained weights: random inputs of the given shapes
            rng = np.random.default_rng(task.get("seed", 0))
            task_arrays = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in task["random"].items()}
        else:
            task_arrays = {name: arrays[f"{task['prefix']}{name}"] for name in task["names"]}
        if task["kind"] == "generate":
            result, outs = generate_job(Parties(task["protocol"], task.get("fraction_bits", FRACTION_BITS)), task, task_arrays)
        else:  # with ``heads_side_by_side`` every KV head in a lane of its own
            lanes = task_arrays["q"].shape[0] if task.get("heads_side_by_side") else 1
            parties = Parties(task["protocol"], task.get("fraction_bits", FRACTION_BITS), lanes)
            result, outs = attention_job(HeadLanes(parties) if lanes > 1 else parties, task, task_arrays)
        results.append({**{k: task[k] for k in ("protocol", "kind", "label") if k in task}, **result})
        outputs.update({f"{i}/{name}": value for name, value in outs.items()})
        Path(job["result"]).write_text(json.dumps(results, indent=1))  # what finished survives a later failure
    np.savez(job["outputs"], **outputs)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
