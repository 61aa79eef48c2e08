"""Private greedy generation under SPU (a task of kvtier/mpc/spu_worker.py): the weights and the prompt are secret-shared
once, the prefill, MPCache's eviction and every decoding step run as SPU programs on the shares, and only each
generated token is revealed to the client (with ``reveal_logits``, its logits too: the client owns the output).
The weights and the prompt's cache (after the eviction) stay held in the parties' runtimes, so under semi2k their
Beaver masks are opened once and reused by every later product. Each program's cost is read from SPU's counters."""

from __future__ import annotations

from functools import partial

import jax
import numpy as np
from spu_llama import LAYER_WEIGHTS, Shape, cluster_bounds, decode, evict, prefill
from spu_programs import Bound, Plan, one_hot_by_bits


def _weights(parties, arrays: dict[str, np.ndarray], shape: Shape) -> dict:
    """The checkpoint's arrays, secret-shared once (the server's input) and kept in the parties' runtimes, so every
    program reads the same shares (what lets semi2k reuse their masks)."""
    share = parties.keep
    return {"embed": share(arrays["embed"]), "norm": share(arrays["norm"]), "lm_head": share(arrays["lm_head"]),
            "layers": [{name: share(arrays[f"layers.{i}.{name}"]) for name in LAYER_WEIGHTS} for i in range(shape.layers)]}


def _run(parties, fn, *trees):
    """``fn`` on pytrees of secrets: its output pytree (still secret), the cost and the seconds."""
    leaves, treedef = jax.tree_util.tree_flatten(trees)
    examples = [jax.ShapeDtypeStruct(s.shape, s.dtype) for s in leaves]

    def flat(*args):
        return fn(*jax.tree_util.tree_unflatten(treedef, list(args)))

    out_tree = jax.tree_util.tree_structure(jax.eval_shape(flat, *examples))
    outs, cost, seconds = parties.run(flat, leaves)
    return jax.tree_util.tree_unflatten(out_tree, outs), cost, seconds


def generate_job(parties, task: dict, arrays: dict[str, np.ndarray]) -> tuple[dict, dict[str, np.ndarray]]:
    shape = Shape(**task["shape"])
    weights = _weights(parties, arrays, shape)
    prompt = np.asarray(task["prompt"])
    rows = parties.share((prompt[:, None] == np.arange(shape.vocab)).astype(np.float32))  # the client's input
    mp = task.get("mpcache")
    window = mp["window"] if mp else 1
    programs, tokens, logits = [], [], []

    def note(name: str, cost, seconds: float) -> None:
        programs.append({"program": name, "bytes": cost.bytes, "rounds": cost.rounds, "ops": cost.ops, "seconds": seconds})

    (index, row, caches, windows, last), cost, seconds = _run(parties, lambda w, r: prefill(shape, w, r, window), weights, rows)
    note("prefill", cost, seconds)
    if mp:
        def look_once(caches, windows):
            out, previous = [], None
            for layer, (cache, q) in enumerate(zip(caches, windows)):
                k, v = cache["kt"].transpose(0, 2, 1), cache["v"]
                if mp["kept"] < k.shape[1]:
                    k, v, previous = evict(shape, k, v, q, mp["kept"], previous if mp["shares"][layer] else None)
                bounds = {}
                for level, size in ((1, mp["size1"]), (2, mp["size2"])):
                    bounds[f"lo{level}"], bounds[f"hi{level}"] = cluster_bounds(k, size)
                out.append({"kt": k.transpose(0, 2, 1), "v": v, "bounds": bounds})
            return out

        caches, cost, seconds = _run(parties, look_once, caches, windows)
        note("eviction" if mp["kept"] < len(prompt) else "cluster bounds", cost, seconds)
    # the prompt's cache is written once: held in the runtimes, its masks are opened at the first step and reused
    caches = [{**cache, "kt": parties.hold(cache["kt"]), "v": parties.hold(cache["v"]), "tail": None} for cache in caches]
    for step in range(task["max_tokens"]):
        tokens.append(int(parties.reveal(index)))
        if task.get("reveal_logits"):
            logits.append(parties.reveal(last))
        if step == task["max_tokens"] - 1:
            break
        position = len(prompt) + step
        selections = None
        if mp:
            counts = mp["steps"][step]
            selections = [Plan(counts["keep1"], counts["keep2"], mp["size2"], mp["size1"] // mp["size2"], Bound(mp["bound"], mp["alpha"]),
                               mp["hierarchy"], one_hot_by_bits(task["protocol"]))] * shape.layers

        step_fn = partial(decode, shape, position=position, selections=selections, shares=mp["shares"] if mp else [False] * shape.layers)
        (index, row, changed, last), cost, seconds = _run(parties, step_fn, weights, row, caches)
        caches = [{**cache, **new} for cache, new in zip(caches, changed)]
        note(f"decode {step + 1}", cost, seconds)
    outputs = {"tokens": np.array(tokens)}
    if logits:
        outputs["logits"] = np.stack([np.asarray(x).reshape(-1) for x in logits])
    return {"tokens": tokens, "programs": programs}, outputs
