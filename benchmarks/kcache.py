"""KCache's report (docs/kcache.md), every figure from one run on the shipped kvtier-tiny (fp32):

- exactness: N >= the context gives the full cache's logits and greedy tokens (kvtier-tiny: GQA; a random MHA Llama);
- error vs N: along the full cache's path, the attention mass the Top-N captures and the relative L2 error of the
  attention output (renormalised, truncated, and with the residual's block means), per layer, over held-out text at 2K;
- accuracy: passkey and multi-key needles through ``kvtier eval``: full cache, KCache at several N, and Quest and H2O
  reading the same number of V rows per KV head;
- ablation: the same samples at N = ``--equal-cost`` with probabilities truncated, per-KV-head Top-N, and the first one
  or two layers dense;
- dense: KCache (per query head and per KV head) and Quest at that N with their first ``--dense-layers`` layers dense, as
  Quest's own evaluation runs (H2O evicts in every layer, so its accuracy section's figure stands);
- residual: every layer sparse, KCache at that N plain and with ``residual`` (the missing mass to each block's mean
  value), per query head and per KV head, beside Quest and H2O at that N, on the same samples;
- memory: device and host bytes per token (a block's own rows, such as the residual's V sum, spread over its tokens), and
  the largest batch a fixed device budget holds at 1K, 2K and 4K;
- throughput: decode tokens/s vs context under that budget, the full cache and KCache (plain and with the residual)
  each at their largest batch;
- kernel: what bounds that throughput on a CPU, one layer's decode attention at 4K through the ``cpu`` backend's kernel
  (kvtier-tiny's shape, blocks scattered): the full cache and KCache at several N, at the two caches' batches.

    python benchmarks/kcache.py --json-out benchmarks/results/kcache-cpu.json --markdown-out benchmarks/results/kcache-cpu.md \\
        --plot-out benchmarks/results/kcache-cpu.png
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from report_io import eval_sections, write_report
from sliding_window import peak_decoding, random_prompts

from kvtier import LLM, SamplingParams
from kvtier.cache.layer_cache import LayerCache
from kvtier.cache.specs import blocks_needed
from kvtier.eval.agreement import text_windows
from kvtier.eval.harness import markdown_table, run_eval
from kvtier.machine import machine_line
from kvtier.models.checkpoint_builder import build_random_checkpoint
from kvtier.sampling.logits_processors import RecordLogits

SECTIONS = ("exactness", "error", "accuracy", "ablation", "dense", "residual", "memory", "throughput", "kernel")
ABLATIONS = ({}, {"renormalize": False}, {"per_kv_head": True}, {"dense_layers": 1}, {"dense_layers": 2})


def greedy_logits(llm: LLM, prompt: list[int], tokens: int) -> tuple[list[int], torch.Tensor]:
    record = RecordLogits()
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True, logits_processors=[record]),
                       use_tqdm=False)[0]
    return list(out.outputs[0].token_ids), torch.stack(record.logits)


def exactness(models: dict[str, str], prompt_len: int, steps: int, **engine_args: object) -> list[dict]:
    """Per model and config with N >= the context: the largest logit difference from the full cache and whether the
    greedy tokens are the same over ``steps`` steps. ``engine_args``: more of every engine's arguments (``device``)."""
    rows = []
    for name, path in models.items():
        base = LLM(path, dtype="float32", kv_cache_memory=1 << 26, **engine_args)
        vocab, cfg = base.engine.model_config.vocab_size, base.engine.model_config
        prompt = random_prompts(1, prompt_len, vocab, seed=0)[0]
        tokens, full = greedy_logits(base, prompt, steps)
        del base
        for config in ({"top_n": prompt_len + steps}, {"top_n": 1.0, "renormalize": False, "per_kv_head": True}):
            mine_tokens, mine = greedy_logits(LLM(path, dtype="float32", kv_cache_memory=1 << 26, kv_method="kcache", kv_method_config=config,
                                                  **engine_args), prompt, steps)
            rows.append({"model": name, "heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads, "config": config,
                         "steps": steps, "max_abs_logit_diff": (mine - full).abs().max().item(), "same_tokens": mine_tokens == tokens})
    return rows


class Recorder:
    """Stands in for KCache's decode hook: reads V whole (so the run follows the full cache), and measures what each N
    would have given: the captured mass and the relative L2 error of the output, renormalised, truncated, and with the
    residual (the mass not read, block by block, times the block's mean value)."""

    observes_decode = False
    reads_values = True
    value_selection = None  # not a plain Top-N read: a kernel cannot stand in for it

    def __init__(self, ns: list[int], num_layers: int) -> None:
        self.ns, self.num_layers = ns, num_layers
        self.calls = 0
        self.sums = {(n, layer, key): 0.0 for n in ns for layer in range(num_layers) for key in ("mass", "renorm", "trunc", "resid", "count")}

    def select_blocks(self, q, cache, group):
        return None

    def read_values(self, probs: torch.Tensor, cache: LayerCache, slots: torch.Tensor, context_lens: torch.Tensor) -> torch.Tensor:
        values = cache.v
        layer = self.calls % self.num_layers  # one call per layer, in order (one sequence decoding)
        self.calls += 1
        rows, kv_heads, group, width = probs.shape
        v = values[:, slots.flatten()].view(kv_heads, rows, width, -1).transpose(0, 1).double()  # [rows, kv_heads, width, D]
        p = probs.double()
        dense = p @ v  # [rows, kv_heads, group, D]
        norm = dense.norm(dim=-1)
        bs = values.shape[1] // cache.value_sums.shape[1] if cache.value_sums is not None else 16
        block = torch.arange(width, device=p.device) // bs
        visible = (torch.arange(width, device=p.device) < context_lens[:, None]).double()  # [rows, width]
        tokens = torch.zeros(rows, int(block[-1]) + 1, dtype=p.dtype).index_add_(1, block, visible)  # [rows, blocks]
        means = torch.zeros(rows, kv_heads, tokens.shape[1], v.shape[-1], dtype=p.dtype).index_add_(2, block, v * visible[:, None, :, None])
        means = means / tokens.clamp(min=1)[:, None, :, None]  # each block's mean value [rows, kv_heads, blocks, D]
        for n in self.ns:
            top = p.topk(min(n, width), -1)
            mass = top.values.sum(-1)  # [rows, kv_heads, group]
            index = top.indices[..., None].expand(*top.indices.shape, v.shape[-1])
            picked = v[:, :, None].expand(-1, -1, group, -1, -1).gather(3, index)  # [rows, kv_heads, group, n, D]
            trunc = (top.values.unsqueeze(-2) @ picked).squeeze(-2)
            renorm = trunc / mass[..., None]
            missing = torch.zeros(*p.shape[:3], tokens.shape[1], dtype=p.dtype).index_add_(3, block, p.scatter(-1, top.indices, 0.0))
            resid = trunc + missing @ means
            s = self.sums
            s[(n, layer, "mass")] += mass.sum().item()
            s[(n, layer, "renorm")] += ((renorm - dense).norm(dim=-1) / norm).sum().item()
            s[(n, layer, "trunc")] += ((trunc - dense).norm(dim=-1) / norm).sum().item()
            s[(n, layer, "resid")] += ((resid - dense).norm(dim=-1) / norm).sum().item()
            s[(n, layer, "count")] += mass.numel()
        return dense.float()


def error_vs_n(model: str, ns: list[int], context: int, windows: int, steps: int) -> list[dict]:
    llm = LLM(model, dtype="float32", kv_method="kcache", enable_prefix_caching=False)
    cfg = llm.engine.model_config
    recorder = Recorder(ns, cfg.num_hidden_layers)
    llm.engine.runner.decode_hooks = recorder
    for prompt in text_windows(llm, context, windows, seed=0):
        llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True), use_tqdm=False)
    s = recorder.sums
    return [{"n": n, "layer": layer, "captured_mass": s[(n, layer, "mass")] / s[(n, layer, "count")],
             "rel_err_renormalized": s[(n, layer, "renorm")] / s[(n, layer, "count")],
             "rel_err_truncated": s[(n, layer, "trunc")] / s[(n, layer, "count")],
             "rel_err_residual": s[(n, layer, "resid")] / s[(n, layer, "count")]} for n in ns for layer in range(cfg.num_hidden_layers)]


def memory(model: str, contexts: list[int], full_seqs: int) -> dict:
    """Bytes per token by the engine's accounting (a block's device bytes over its tokens), and the largest batch of
    ``context``-token sequences the device budget of ``full_seqs`` full-cache sequences holds, for the full cache and
    KCache with 0, 1 and 2 dense layers and with the residual."""
    per_token = {}
    rows = []
    configs = {"full cache": None, **{f"kcache, {d} dense": {"dense_layers": d} for d in (0, 1, 2)}, "kcache, residual": {"residual": True}}
    for context in contexts:
        budget = None
        for name, config in configs.items():
            kw = {} if config is None else {"kv_method": "kcache", "kv_method_config": config}
            probe = LLM(model, dtype="float32", kv_cache_memory=1 << 20, **kw).engine.memory_plan
            budget = budget or full_seqs * context * probe.bytes_per_token
            plan = LLM(model, dtype="float32", kv_cache_memory=budget, **kw).engine.memory_plan
            per_token[name] = {"device": sum(g.bytes_per_block for g in plan.groups) // plan.block_size, "host": plan.tier_bytes_per_token}
            batch = min(g.num_blocks // blocks_needed(context, plan.block_size) for g in plan.groups)
            rows.append({"context": context, "cache": name, "device_budget": budget, "largest_batch": batch})
    return {"bytes_per_token": per_token, "batches": rows}


def throughput(model: str, contexts: list[int], full_seqs: int, max_tokens: int, top_n: int, repeats: int, **engine_args: object) -> list[dict]:
    """Decode throughput at each context (prompt + ``max_tokens`` = context) under the device budget of ``full_seqs``
    full-cache sequences, for the full cache and KCache plain and with the residual: as many requests as the largest
    batch, so once all are prefilled they decode together; the caches' runs interleaved, ``repeats`` times.
    ``engine_args``: more of every engine's arguments (``device``)."""
    rows = []
    for context in contexts:
        probe = LLM(model, dtype="float32", kv_cache_memory=1 << 20, **engine_args).engine
        budget, vocab = full_seqs * context * probe.memory_plan.bytes_per_token, probe.model_config.vocab_size
        del probe
        for rep in range(repeats):
            for name, kw in (("full cache", {}), (f"kcache N={top_n}", {"kv_method": "kcache", "kv_method_config": {"top_n": top_n}}),
                             (f"kcache N={top_n}, residual", {"kv_method": "kcache", "kv_method_config": {"top_n": top_n, "residual": True}})):
                llm = LLM(model, dtype="float32", kv_cache_memory=budget, enable_prefix_caching=False, **engine_args, **kw)
                plan = llm.engine.memory_plan
                batch = min(g.num_blocks // blocks_needed(context, plan.block_size) for g in plan.groups)
                prompts = random_prompts(batch, context - max_tokens, vocab, seed=rep)
                r = peak_decoding(llm.engine, prompts, max_tokens)
                rows.append({"context": context, "cache": name, "repeat": rep, "largest_batch": batch, **r})
                del llm
    return rows


def kernel(model: str, context: int, batches: tuple[int, ...], ns: tuple[int, ...], repeats: int = 30) -> list[dict]:
    """Milliseconds per call of the ``cpu`` backend's decode kernel for one layer: every row at ``context`` keys in
    shuffled blocks, the full cache and KCache at each N (N = 1 is the K pass alone: scores and softmax)."""
    from types import SimpleNamespace

    from kvtier.attention.cpu import CpuPagedBackend
    from kvtier.attention.metadata import DecodeGroup
    from kvtier.kv_methods.kcache import KCache, KCacheConfig

    cfg = LLM(model, dtype="float32", kv_cache_memory=1 << 20).engine.model_config
    backend, bs, g = CpuPagedBackend(), 16, torch.Generator().manual_seed(0)
    heads, kv_heads, dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    rows = []
    for batch in batches:
        width = context // bs
        k, v = (torch.randn(kv_heads, (batch * width + 1) * bs, dim, generator=g) for _ in range(2))
        lens = torch.full((batch,), context)
        group = DecodeGroup(0, (torch.randperm(batch * width, generator=g) + 1), lens, lens - 1, bs, None, None)
        cache, q = SimpleNamespace(k=k, v=v), torch.randn(batch, heads, dim, generator=g)
        for name, hooks in [("full cache", None)] + [(f"kcache N={n}", KCache(KCacheConfig(top_n=n))) for n in ns]:
            call = functools.partial(backend.decode, q, cache, group, dim**-0.5, hooks=hooks)
            call()
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                call()
                times.append(time.perf_counter() - start)
            rows.append({"context": context, "batch": batch, "cache": name, "ms": round(1e3 * statistics.median(times), 3)})
    return rows


def report(result: dict) -> str:
    lines = [f"KCache on {result['model']} (fp32); {result['machine']}", ""]
    if "exactness" in result:
        lines += ["Exactness, N >= context (greedy, random prompt):", "", "| model | heads / KV heads | config | steps | max abs logit diff | same tokens |",
                  "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {r['model']} | {r['heads']} / {r['kv_heads']} | `{r['config']}` | {r['steps']} | {r['max_abs_logit_diff']:.2e} | {r['same_tokens']} |"
                  for r in result["exactness"]]
        lines.append("")
    if "error" in result:
        rows = result["error"]
        layers = sorted({r["layer"] for r in rows})
        lines += ["Error vs N along the full cache's path (held-out text, mean over decode queries and heads); per layer: captured "
                  "mass / relative L2 error renormalised / truncated / with the residual:", "",
                  "| N | " + " | ".join(f"layer {layer}" for layer in layers) + " |", "| --- |" + " --- |" * len(layers)]
        for n in sorted({r["n"] for r in rows}):
            cells = {r["layer"]: r for r in rows if r["n"] == n}
            lines.append(f"| {n} | " + " | ".join(f"{cells[layer]['captured_mass']:.3f} / {cells[layer]['rel_err_renormalized']:.3f} / "
                                                  f"{cells[layer]['rel_err_truncated']:.3f} / {cells[layer]['rel_err_residual']:.3f}"
                                                  for layer in layers) + " |")
        lines.append("")
    lines += eval_sections(result)
    if "dense" in result:
        lines += [f"KCache and Quest with their first {result['dense_layers']} layers dense (`kvtier eval`):", "", markdown_table(result["dense"]), ""]
    if "residual" in result:
        lines += ["KCache with the residual, beside Quest and H2O, every layer sparse (`kvtier eval`):", "", markdown_table(result["residual"]), ""]
    if "memory" in result:
        mem = result["memory"]
        lines += ["Bytes per token (all layers, engine accounting):", "", "| cache | device | host tier | device / full |", "| --- | --- | --- | --- |"]
        full = mem["bytes_per_token"]["full cache"]["device"]
        lines += [f"| {name} | {b['device']:,} | {b['host']:,} | {b['device'] / full:.0%} |" for name, b in mem["bytes_per_token"].items()]
        lines += ["", "Largest batch under a fixed device budget (what the full cache needs for 4 sequences):", "",
                  "| context | device budget | " + " | ".join(mem["bytes_per_token"]) + " |", "| --- | --- |" + " --- |" * len(mem["bytes_per_token"])]
        for context in sorted({r["context"] for r in mem["batches"]}):
            rs = [r for r in mem["batches"] if r["context"] == context]
            lines.append(f"| {context} | {rs[0]['device_budget']:,} | " + " | ".join(str(r["largest_batch"]) for r in rs) + " |")
        lines.append("")
    if "throughput" in result:
        lines += ["Decode throughput under that budget, each cache at its largest batch (decode-only steps; median of repeats):", "",
                  "| context | cache | batch | peak decoding | decode tok/s | x full |", "| --- | --- | --- | --- | --- | --- |"]
        rows = result["throughput"]
        for context in sorted({r["context"] for r in rows}):
            by_cache: dict[str, list[dict]] = {}
            for r in rows:
                if r["context"] == context:
                    by_cache.setdefault(r["cache"], []).append(r)
            med = {name: statistics.median(x["decode_only_tokens_per_s"] for x in rs) for name, rs in by_cache.items()}
            for name, rs in by_cache.items():
                lines.append(f"| {context} | {name} | {rs[0]['largest_batch']} | {rs[0]['peak_decoding']} | {med[name]} | "
                             f"{med[name] / med['full cache']:.2f} |")
    if "kernel" in result:
        full = {r["batch"]: r["ms"] for r in result["kernel"] if r["cache"] == "full cache"}
        lines += ["", "One layer's decode attention in the `cpu` kernel (ms a call, median; N = 1: the K pass alone):", "",
                  "| context | batch | cache | ms | x full at that batch |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {r['context']} | {r['batch']} | {r['cache']} | {r['ms']} | {r['ms'] / full[r['batch']]:.2f} |" for r in result["kernel"]]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["error"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for layer in sorted({r["layer"] for r in rows}):
        rs = sorted((r for r in rows if r["layer"] == layer), key=lambda r: r["n"])
        line = a.plot([r["n"] for r in rs], [r["captured_mass"] for r in rs], marker="o", label=f"layer {layer}")[0]
        b.plot([r["n"] for r in rs], [r["rel_err_renormalized"] for r in rs], marker="o", color=line.get_color())
        b.plot([r["n"] for r in rs], [r["rel_err_residual"] for r in rs], marker="x", linestyle="--", color=line.get_color())
    for ax, title in ((a, "attention mass in the Top-N"), (b, "relative L2 error of the output\n(solid: renormalised; dashed: residual)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("N (V rows per head)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    a.legend()
    fig.suptitle(f"KCache on {result['model']}, {result['machine']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="kvtier-tiny")
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    p.add_argument("--ns", nargs="+", type=int, default=[8, 16, 32, 64, 128, 256, 512])
    p.add_argument("--eval-ns", nargs="+", type=int, default=[16, 32, 64, 128], help="KCache's N in the accuracy section")
    p.add_argument("--equal-cost", type=int, default=64, help="the V rows per KV head Quest and H2O read beside KCache")
    p.add_argument("--dense-layers", type=int, default=2, help="the dense section's dense layers (Quest's evaluation keeps 2)")
    p.add_argument("--tasks", nargs="+", default=["passkey", "multikey"])
    p.add_argument("--contexts", nargs="+", type=int, default=[1024, 2048, 4000])
    p.add_argument("--trials", type=int, default=200)
    p.add_argument("--haystack", default="noise")
    p.add_argument("--full-seqs", type=int, default=4, help="the device budget: what this many full-cache sequences need")
    p.add_argument("--max-tokens", type=int, default=256, help="decoded per request in the throughput section")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="the engine's device in the exactness and throughput sections")
    p.add_argument("--json-out", type=Path)
    p.add_argument("--markdown-out", type=Path)
    p.add_argument("--plot-out", type=Path)
    args = p.parse_args(argv)
    result: dict = {"machine": machine_line(), "model": args.model}
    started = time.perf_counter()
    if "exactness" in args.sections:
        with tempfile.TemporaryDirectory() as tmp:
            mha = build_random_checkpoint(Path(tmp) / "mha", hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                          intermediate_size=256, vocab_size=512, tokenizer_vocab_size=512, max_position_embeddings=1024)
            result["exactness"] = exactness({args.model: args.model, "random MHA Llama": str(mha)}, 256, 256, device=args.device)
    if "error" in args.sections:
        result["error"] = error_vs_n(args.model, args.ns, 2048, 4, 32)
    if "accuracy" in args.sections:
        baselines = run_eval(args.model, ["quest", "h2o"], None, [args.equal_cost], args.tasks, args.contexts, args.trials, haystack=args.haystack,
                             dtype="float32")
        kcache = run_eval(args.model, "kcache", None, args.eval_ns, args.tasks, args.contexts, args.trials, haystack=args.haystack, dtype="float32")
        kcache["cells"] += [c for c in baselines["cells"] if c["method"] != "full cache"]
        kcache["kv_method"] = ["kcache", "quest", "h2o"]
        result["accuracy"] = kcache
    if "ablation" in args.sections:
        result["ablation"] = run_eval(args.model, "kcache", None, [args.equal_cost], args.tasks, args.contexts, args.trials, haystack=args.haystack,
                                      variants=ABLATIONS, dtype="float32")
    if "dense" in args.sections:
        dense = {"dense_layers": args.dense_layers}
        grid = run_eval(args.model, "kcache", dense, [args.equal_cost], args.tasks, args.contexts, args.trials, haystack=args.haystack,
                        variants=({}, {"per_kv_head": True}), dtype="float32")
        quest = run_eval(args.model, "quest", dense, [args.equal_cost], args.tasks, args.contexts, args.trials, haystack=args.haystack, dtype="float32")
        grid["cells"] += [c for c in quest["cells"] if c["method"] != "full cache"]
        grid["kv_method"] = ["kcache", "quest"]
        result["dense"], result["dense_layers"] = grid, args.dense_layers
    if "residual" in args.sections:
        grid = run_eval(args.model, "kcache", None, [args.equal_cost], args.tasks, args.contexts, args.trials, haystack=args.haystack,
                        variants=({}, {"residual": True}, {"residual": True, "per_kv_head": True}), dtype="float32")
        baselines = run_eval(args.model, ["quest", "h2o"], None, [args.equal_cost], args.tasks, args.contexts, args.trials, haystack=args.haystack,
                             dtype="float32")
        grid["cells"] += [c for c in baselines["cells"] if c["method"] != "full cache"]
        grid["kv_method"] = ["kcache", "quest", "h2o"]
        result["residual"] = grid
    if "memory" in args.sections:
        result["memory"] = memory(args.model, [1024, 2048, 4096], args.full_seqs)
    if "throughput" in args.sections:
        result["throughput"] = throughput(args.model, [1024, 2048, 4096], args.full_seqs, args.max_tokens, args.equal_cost, args.repeats, device=args.device)
    if "kernel" in args.sections:
        result["kernel"] = kernel(args.model, 4096, (4, 8), (1, 64, 256))
    result["seconds"] = round(time.perf_counter() - started)
    write_report(result, report(result), args.json_out, args.markdown_out)
    if args.plot_out and "error" in result:
        plot(result, args.plot_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
