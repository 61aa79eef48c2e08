"""MPCache's plaintext report (docs/mpcache.md), every figure from one run on the shipped kvtier-tiny (fp32):

- accuracy: passkey and multi-key needles through ``kvtier eval`` at KV budgets of 3%, 6%, 12% and 25%: the full cache,
  MPCache with the paper's defaults, and the baselines (H2O, StreamingLLM, SnapKV, Quest) at the same budgets;
- ablation: MPCache with Quest's exact bound instead of the linearised one, without the hierarchy, without layer
  sharing, with token-level selection, without the static eviction, and with neither the static eviction nor the
  linearisation, on the same samples;
- overlap: along held-out text, how many of the clusters one layer chooses the next layer chooses too (per KV head,
  and over the union of heads), every layer selecting on its own: the measurement that index sharing rests on;
- mpc: under SecretFlow SPU (the MPC environment of scripts/setup_mpc.sh), the attention part of a decoding step,
  full cache against MPCache (paper defaults: 30% static keep, 6% budget), for kvtier-tiny's shape and a GPT-2-shaped
  one on random inputs (cost needs no trained weights), each KV head's programs side by side over links of their own
  (and MPCache's heads batched in one program, SPU's way): bytes and rounds from SPU's own counters, per layer and
  per operator, and latency under the LAN and WAN profiles;
- private: whole decoding steps of private generation (``kvtier private-generate``) on kvtier-tiny's real weights,
  linear layers, embedding and LM head included, full cache against MPCache, with the HAL operations that dominate;
  and the prefill and the look-once eviction under MPC at the same small T.

    python benchmarks/mpcache.py --json-out benchmarks/results/mpcache-cpu.json --markdown-out benchmarks/results/mpcache-cpu.md \\
        --plot-out benchmarks/results/mpcache-cpu.png --mpc-plot-out benchmarks/results/mpcache-mpc-cpu.png
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from report_io import eval_sections, write_report

from kvtier import LLM, SamplingParams
from kvtier.eval.agreement import text_windows
from kvtier.eval.harness import parse_variant, run_eval
from kvtier.eval.plots import plot_scores
from kvtier.kv_methods.mpcache import MPCache, MPCacheConfig
from kvtier.machine import machine_line
from kvtier.mpc.driver import run_mpc
from kvtier.mpc.network import NETWORKS
from kvtier.mpc.private_generate import private_generate

SECTIONS = ("accuracy", "ablation", "overlap", "mpc", "private")
SHAPES = {"kvtier-tiny": {"kv_heads": 4, "group": 2, "head_dim": 32, "layers": 6},  # the shipped model's attention
          "GPT-2 shape": {"kv_heads": 12, "group": 1, "head_dim": 64, "layers": 12}}  # the paper's MPC model (random weights)
BASELINES = ("h2o", "streamingllm", "snapkv", "quest")
MPC_CONFIGS = {"mpcache": {}, "mpcache (bound=quest)": {"bound": "quest"},  # paper defaults; Quest's exact bound at the same price
               "mpcache (static_keep=1.0, bound=quest) @ 0.12": {"static_keep": 1.0, "bound": "quest", "budget": 0.12},  # the accurate one
               # budgets of a fixed number of tokens, as in the paper's 2048-token tables: 64 is the default's 6% at 1K
               "mpcache @ 64 tokens": {"budget": 64}, "mpcache @ 256 tokens": {"budget": 256},
               # under MPC level 2 scores every cluster anyway (which ones are children of level 1's choice is secret):
               # the hierarchy adds a similarity and a top-k to a step's rounds and saves none
               "mpcache (hierarchy=false)": {"hierarchy": False}, "mpcache (hierarchy=false) @ 64 tokens": {"hierarchy": False, "budget": 64},
               "mpcache, KV heads in one program": {}}
# Both methods run each KV head's programs in a lane of its own, side by side (as the paper's rank.cc forks a context
# per head for its top-k); this one runs them batched in one program, where SPU's top-k takes the heads one after another
ONE_PROGRAM = {"mpcache, KV heads in one program"}
ABLATIONS = ({"bound": "quest"}, {"hierarchy": False}, {"share_layers": False}, {"granularity": "token"}, {"static_keep": 1.0},
             {"static_keep": 1.0, "bound": "quest"})


class OverlapRecorder(MPCache):
    """MPCache with every layer selecting on its own, noting which blocks each layer's KV heads read at each step."""

    def __init__(self, config: MPCacheConfig) -> None:
        super().__init__(config)
        self.steps: list[dict[int, list[set[int]]]] = []

    def select_blocks(self, q, cache, group):
        selection = super().select_blocks(q, cache, group)
        if cache.index == 0:
            self.steps.append({})
        if selection is not None:  # one sequence decoding: a chosen block is one with a visible key
            heads = selection.block_ids.shape[0]
            seen = selection.mask.view(heads, -1, group.block_size).any(-1)
            self.steps[-1][cache.index] = [set(selection.block_ids[h][seen[h]].tolist()) for h in range(heads)]
        return selection


def overlap(model: str, budget: float, context: int, windows: int, steps: int) -> list[dict]:
    """Mean |chosen(l) & chosen(l+1)| / |chosen(l)| over decode steps, per adjacent layer pair: matched KV head by KV
    head, and over the union of each layer's heads."""
    config = {"budget": budget, "share_layers": False, "static_keep": 1.0}
    llm = LLM(model, dtype="float32", kv_method="mpcache", kv_method_config=config, enable_prefix_caching=False)
    recorder = OverlapRecorder(MPCacheConfig(**config))
    llm.engine.runner.decode_hooks = recorder
    for prompt in text_windows(llm, context, windows, seed=1):
        llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True), use_tqdm=False)
    layers = llm.engine.model_config.num_hidden_layers
    rows = []
    for layer in range(layers - 1):
        pairs = [(s[layer], s[layer + 1]) for s in recorder.steps if layer in s and layer + 1 in s]
        per_head = [len(a & b) / len(a) for x, y in pairs for a, b in zip(x, y)]
        union = [len(set().union(*x) & set().union(*y)) / len(set().union(*x)) for x, y in pairs]
        rows.append({"layers": f"{layer}-{layer + 1}", "steps": len(pairs), "per_head": sum(per_head) / len(per_head),
                     "union": sum(union) / len(union), "shared_by_default": MPCache(MPCacheConfig()).shares(layer + 1)})
    return rows


def mpc_tasks(shape: dict, context: int, protocol: str, methods: dict[str, MPCache]) -> list[dict]:
    """One layer's attention at ``context`` tokens: the full cache over all of them, and each MPCache configuration over
    what its static eviction retains (whole level-1 clusters) reading its budget; random secret inputs."""
    h, g, d = shape["kv_heads"], shape["group"], shape["head_dim"]
    tasks = [{"kind": "full", "label": {"method": "full"}, "random": {"q": [h, g, d], "k": [h, context, d], "v": [h, context, d]},
              "params": {"scale": d ** -0.5}}]
    for label, method in methods.items():
        cfg = method.config
        retained = cfg.static_kept(context) // cfg.cluster_size1 * cfg.cluster_size1
        keep1, keep2 = method.clusters_read(retained, context)
        c1, c2 = retained // cfg.cluster_size1, retained // cfg.cluster_size2
        tasks.append({"kind": "mpcache", "label": {"method": label, "retained": retained, "keep1": keep1, "keep2": keep2},
                      "random": {"q": [h, g, d], "k": [h, retained, d], "v": [h, retained, d], "lo1": [h, c1, d], "hi1": [h, c1, d],
                                 "lo2": [h, c2, d], "hi2": [h, c2, d]},
                      "params": {"scale": d ** -0.5, "keep1": keep1, "keep2": keep2, "size": cfg.cluster_size2, "per": cfg.cluster_size1 // cfg.cluster_size2,
                                 "hierarchy": cfg.hierarchy, "bound": cfg.bound, "alpha": cfg.alpha}})
    return [{**t, "protocol": protocol, "breakdown": True, "heads_side_by_side": t["label"]["method"] not in ONE_PROGRAM,
             "label": {"context": context, **t["label"]}} for t in tasks]


def mpc_costs(protocols: list[str], contexts: dict[str, list[int]]) -> list[dict]:
    """Per model shape, protocol and context: each method's per-layer cost (one fused program), its operators (each its
    own program, for attribution), and the attention part of a whole step: every layer's fused program, where a layer
    that shares its neighbour's selection runs only the attention over the chosen clusters. ``step`` is a later
    step's cost (under semi2k the masks of the cache, opened at the first step, are reused), ``first_step`` the cost of
    the first step over a cache the parties have not opened yet."""
    methods = {label: MPCache(MPCacheConfig(**config)) for label, config in MPC_CONFIGS.items()}
    rows = []
    for model, shape in SHAPES.items():
        for protocol in protocols:
            for context in contexts[model]:
                results, _ = run_mpc(mpc_tasks(shape, context, protocol, methods))
                for r in results:
                    method = methods.get(r["label"]["method"])
                    sharing = sum(method.shares(layer) for layer in range(shape["layers"])) if method else 0
                    step, first = ({k: r[cost][k] * (shape["layers"] - sharing) + r.get(f"{prefix}shared_cost", r[cost])[k] * sharing
                                    for k in ("bytes", "rounds")} for cost, prefix in (("cost", ""), ("first_cost", "first_")))
                    rows.append({"model": model, "protocol": protocol, **r["label"], "layer": r["cost"], "operators": r["operators"],
                                 "step": step, "first_step": first, "simulation_s": round(r["seconds"], 2),
                                 "latency_s": latencies(step["bytes"], step["rounds"])})
    return rows


def latencies(sent: int, rounds: int) -> dict[str, float]:
    """Seconds under each network profile: a one-way delay per round, and (", RTT a round") a whole round trip."""
    return {**{n.name: n.seconds(sent, rounds) for n in NETWORKS}, **{f"{n.name}, RTT a round": n.seconds(sent, rounds, True) for n in NETWORKS}}


def private_steps(model: str, context: int, steps: int, protocol: str) -> list[dict]:
    """Private generation from one held-out prompt of ``context`` tokens, full cache and MPCache (paper defaults): each
    SPU program's cost (prefill, eviction, decoding steps) and its five costliest HAL operations by bytes."""
    prompt = text_windows(LLM(model, dtype="float32", kv_cache_memory=1 << 24), context, 1, seed=2)[0]
    rows = []
    for method in ("none", "mpcache"):
        out = private_generate(model, prompt_token_ids=prompt, max_tokens=steps + 1, kv_method=method, protocol=protocol)
        for p in out.programs:
            top = sorted(p["ops"].items(), key=lambda kv: -kv[1]["bytes"])[:5]
            rows.append({"method": "full" if method == "none" else method, "protocol": protocol, "context": context, "program": p["program"],
                         "bytes": p["bytes"], "rounds": p["rounds"], "latency_s": latencies(p["bytes"], p["rounds"]),
                         "top_ops": [{"op": name, **cost} for name, cost in top]})
    return rows


def private_report(rows: list[dict]) -> list[str]:
    lines = [f"Private generation on kvtier-tiny's weights ({rows[0]['protocol']}, prompt of {rows[0]['context']} held-out tokens): each SPU "
             "program, the whole model (linear layers, embedding and LM head included), and the HAL operations that send the most:", "",
             "| method | program | MB | rounds | LAN s | WAN s | most bytes (MB / rounds) |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        ops = ", ".join(f"{o['op']} {o['bytes'] / 1e6:.1f} / {o['rounds']}" for o in r["top_ops"][:3])
        lines.append(f"| {r['method']} | {r['program']} | {r['bytes'] / 1e6:.1f} | {r['rounds']} | {r['latency_s']['LAN']:.3f} | "
                     f"{r['latency_s']['WAN']:.2f} | {ops} |")
    return lines


def plot_mpc(rows: list[dict], path: Path) -> None:
    """Bytes and LAN latency of the attention part of a step against context, a line per model, protocol and method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bytes_ax, lan_ax) = plt.subplots(1, 2, figsize=(15, 4.5))
    setups = list(dict.fromkeys((r["model"], r["protocol"]) for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))  # "full" first
    for key in dict.fromkeys((r["model"], r["protocol"], r["method"]) for r in rows):
        mine = [r for r in rows if (r["model"], r["protocol"], r["method"]) == key]
        which = methods.index(key[2])
        style = {"linestyle": ["--", "-", ":", "-."][which % 4], "marker": "osv^DP"[which % 6], "color": f"C{setups.index(key[:2])}", "label": ", ".join(key)}
        contexts = [r["context"] for r in mine]
        bytes_ax.plot(contexts, [r["step"]["bytes"] / 1e6 for r in mine], **style)
        lan_ax.plot(contexts, [r["latency_s"]["LAN"] for r in mine], **style)
    for ax, title in ((bytes_ax, "MB sent per decoding step (attention part)"), (lan_ax, "LAN seconds per step (attention part)")):
        ax.set(xscale="log", yscale="log", xlabel="context tokens", title=title)
        ax.set_xticks(sorted({r["context"] for r in rows}), [str(c) for c in sorted({r["context"] for r in rows})])
        ax.tick_params(axis="x", which="minor", labelbottom=False)
    lan_ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def ratio(full: dict, mine: dict, network: str) -> float:
    return full["latency_s"][network] / mine["latency_s"][network]


def mpc_report(rows: list[dict]) -> list[str]:
    lines = ["Private decoding under SPU, the attention part of one decoding step (all layers; MPCache: two levels, layer sharing, "
             "30% static keep and 6% budget unless its label says otherwise), bytes sent by all parties and rounds (most send actions of "
             "a party), from SPU's counters; latency from them under the two network profiles, half a round trip a round (and, in the "
             "columns so named, a whole one). Both methods run each KV head's programs side by side, in SPU runtimes over links of their "
             "own (rounds: the busiest lane's), but for the row that says it runs them in one program. A step after the first: "
             "under semi2k the cache's masks, opened at the first step, are reused (SPU's Beaver cache); the first step's bytes, "
             "every mask fresh, are the last columns:", "",
             "| model | protocol | context | method | full MB | method MB | x less | full rounds | method rounds | LAN full / method s | x | "
             "x, RTT a round | WAN full / method s | x | x, RTT a round | first step: full / method MB | x less |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    full_of = {(r["model"], r["protocol"], r["context"]): r for r in rows if r["method"] == "full"}
    for mine in (r for r in rows if r["method"] != "full"):
        full = full_of[(mine["model"], mine["protocol"], mine["context"])]
        lan = (full["latency_s"]["LAN"], mine["latency_s"]["LAN"])
        wan = (full["latency_s"]["WAN"], mine["latency_s"]["WAN"])
        lines.append(f"| {mine['model']} | {mine['protocol']} | {mine['context']} | {mine['method']} | {full['step']['bytes'] / 1e6:.1f} | "
                     f"{mine['step']['bytes'] / 1e6:.1f} | {full['step']['bytes'] / mine['step']['bytes']:.2f} | {full['step']['rounds']} | "
                     f"{mine['step']['rounds']} | {lan[0]:.3f} / {lan[1]:.3f} | {lan[0] / lan[1]:.2f} | {ratio(full, mine, 'LAN, RTT a round'):.2f} | "
                     f"{wan[0]:.2f} / {wan[1]:.2f} | {wan[0] / wan[1]:.2f} | {ratio(full, mine, 'WAN, RTT a round'):.2f} | "
                     f"{full['first_step']['bytes'] / 1e6:.1f} / {mine['first_step']['bytes'] / 1e6:.1f} | "
                     f"{full['first_step']['bytes'] / mine['first_step']['bytes']:.2f} |")
    lines += ["", "Per operator, one layer, a step after the first (MB / rounds):", ""]
    names = list(dict.fromkeys(n for r in rows for n in r["operators"]))
    lines += ["| model | protocol | context | method | " + " | ".join(names) + " |", "| --- | --- | --- | --- |" + " --- |" * len(names)]
    for r in rows:
        cells = [f"{r['operators'][n]['bytes'] / 1e6:.2f} / {r['operators'][n]['rounds']}" if n in r["operators"] else "" for n in names]
        lines.append(f"| {r['model']} | {r['protocol']} | {r['context']} | {r['method']} | " + " | ".join(cells) + " |")
    return lines


def report(result: dict) -> str:
    lines = [f"MPCache on {result['model']} (fp32 in the engine; SPU's fixed point in private decoding); {result['machine']}", ""]
    lines += eval_sections(result, "Accuracy against the KV budget")
    if "overlap" in result:
        o = result["overlap"]
        lines += [f"Adjacent-layer overlap of the chosen clusters (held-out text, {o['context']} tokens, {o['windows']} windows x {o['steps']} "
                  f"decode steps, budget {o['budget']}, every layer selecting; no static eviction):", "",
                  "| layers | steps | per KV head | union of heads | shared by default |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {r['layers']} | {r['steps']} | {r['per_head']:.0%} | {r['union']:.0%} | {'yes' if r['shared_by_default'] else 'no'} |"
                  for r in o["rows"]]
        lines.append("")
    if "mpc" in result:
        lines += mpc_report(result["mpc"])
    if "private" in result:
        lines += ["", *private_report(result["private"])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="kvtier-tiny")
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    p.add_argument("--budgets", nargs="+", type=float, default=[0.03, 0.06, 0.12, 0.25])
    p.add_argument("--ablation-budgets", nargs="+", type=float, default=[0.06, 0.12])
    p.add_argument("--variants", nargs="+", type=parse_variant, default=list(ABLATIONS), help="the ablation section's configs, JSON objects "
                   "('{}': the paper's defaults)")
    p.add_argument("--baselines", nargs="+", default=list(BASELINES))
    p.add_argument("--tasks", nargs="+", default=["passkey", "multikey"])
    p.add_argument("--contexts", nargs="+", type=int, default=[2048])
    p.add_argument("--trials", type=int, default=100)
    p.add_argument("--haystack", default="noise")
    p.add_argument("--protocol", default="query-agnostic")
    p.add_argument("--overlap-budget", type=float, default=0.12)
    p.add_argument("--protocols", nargs="+", default=["semi2k", "aby3"], choices=["semi2k", "cheetah", "aby3"])
    p.add_argument("--mpc-contexts", nargs="+", type=int, default=[512, 1024, 2048, 4096], help="kvtier-tiny's; the GPT-2 shape adds 8192")
    p.add_argument("--private-context", type=int, default=512, help="the prompt of the private section (at most 512 tokens)")
    p.add_argument("--private-steps", type=int, default=2, help="decoding steps in the private section")
    p.add_argument("--json-out", type=Path)
    p.add_argument("--markdown-out", type=Path)
    p.add_argument("--plot-out", type=Path, help="accuracy against budget, a line per method (PNG)")
    p.add_argument("--mpc-plot-out", type=Path, help="MPC bytes and LAN latency against context (PNG)")
    args = p.parse_args(argv)
    result: dict = {"machine": machine_line(), "model": args.model}
    started = time.perf_counter()
    grid = dict(tasks=args.tasks, contexts=args.contexts, trials=args.trials, haystack=args.haystack, protocol=args.protocol, dtype="float32")
    if "accuracy" in args.sections:
        result["accuracy"] = run_eval(args.model, ["mpcache", *args.baselines], None, args.budgets, **grid)
    if "ablation" in args.sections:
        result["ablation"] = run_eval(args.model, "mpcache", None, args.ablation_budgets, variants=args.variants, **grid)
    if "overlap" in args.sections:
        result["overlap"] = {"budget": args.overlap_budget, "context": 2048, "windows": 4, "steps": 32,
                             "rows": overlap(args.model, args.overlap_budget, 2048, 4, 32)}
    if "mpc" in args.sections:
        result["mpc"] = mpc_costs(args.protocols, {"kvtier-tiny": args.mpc_contexts, "GPT-2 shape": [*args.mpc_contexts, 2 * max(args.mpc_contexts)]})
    if "private" in args.sections:
        result["private"] = private_steps(args.model, args.private_context, args.private_steps, args.protocols[0])
    result["seconds"] = round(time.perf_counter() - started)
    write_report(result, report(result), args.json_out, args.markdown_out)
    if args.plot_out and ("accuracy" in result or "ablation" in result):
        plot_scores([r for r in (result.get("accuracy"), result.get("ablation")) if r], args.plot_out)
    if args.mpc_plot_out and "mpc" in result:
        plot_mpc(result["mpc"], args.mpc_plot_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
