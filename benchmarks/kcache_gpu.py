"""KCache on a GPU (issue 21, deliverable 3): exactness through the engine, the decode attention step broken down with
CUDA events, and decode throughput under a fixed device KV budget. Needs a CUDA device; ``--device cpu`` runs the same
code paths at toy sizes (a smoke test: no pinned memory, no events, no zero-copy).

- exactness: N >= the context through ``LLM(..., device="cuda")`` gives the full cache's logits (within ``--tolerance``,
  fp32) and greedy tokens, on kvtier-tiny (GQA) and a random MHA Llama (``kcache.exactness``);
- parts: one layer's decode attention at the given shapes (kvtier-tiny's, and a Llama-7B-like layer: 32 heads, 8 KV
  heads, head dim 128, bf16), timed part by part with CUDA events on the functions the engine runs: K gather + q.K^T
  (``paged._gather`` and a bmm per KV head), softmax, Top-N (KCache's selection), the V gather + transfer and the
  weighted sum. The V gather is timed four ways: as the engine does it (``KCache.read_values``' gather, zero-copy), the indices
  copied to the host and the rows gathered into pageable memory, then a synchronous copy (the engine before this
  change); the rows gathered into a pinned staging buffer, one asynchronous copy; and zero-copy, a GPU ``index_select``
  on a CUDA view of the pinned V pool (UVA), reading host memory over the bus. Whole steps: the full cache (V in device
  memory), KCache with each gather, and KCache overlapped, the batch split in two so that one half's V gather runs
  beside the other half's q.K^T (the next layer cannot start before this layer's output, so the overlap is within a
  layer);
- throughput: decode tokens/s of the full cache and KCache at 4K under the device budget of ``--full-seqs`` full-cache
  sequences, each at its largest batch, through the engine (``kcache.throughput``).

    python benchmarks/kcache_gpu.py --json-out kcache-gpu.json --markdown-out kcache-gpu.md
    python benchmarks/kcache_gpu.py --device cpu --sections parts --smoke     # the code paths, on a CPU, tiny
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from report_io import write_report

from kvtier.cache.host_view import device_view
from kvtier.cache.layer_cache import LayerCache
from kvtier.kv_methods.kcache import KCache, KCacheConfig
from kvtier.machine import machine_line
from kvtier.models.checkpoint_builder import build_random_checkpoint

try:  # the engine's own K gather; a local copy if the attention module is being reworked
    from kvtier.attention.paged import _gather
except ImportError:  # pragma: no cover
    def _gather(cache_head: torch.Tensor, block_ids: torch.Tensor, batch: int, block_size: int) -> torch.Tensor:
        slots, dim = cache_head.shape
        return F.embedding(block_ids, cache_head.view(slots // block_size, block_size * dim)).view(batch, -1, dim)

SECTIONS = ("exactness", "parts", "throughput")
BLOCK = 16
# name: heads, KV heads, head dim, dtype, [(context, batch)]
SHAPES = {
    "kvtier-tiny": (8, 4, 32, torch.float32, [(4096, 32), (4096, 128)]),
    "llama-7b-like": (32, 8, 128, torch.bfloat16, [(4096, 8), (4096, 32), (16384, 8), (16384, 32), (32768, 8), (32768, 32)]),
}
SMOKE = {"kvtier-tiny": (8, 4, 32, torch.float32, [(256, 2)]), "llama-7b-like": (8, 2, 16, torch.float32, [(512, 2)])}


# ---------------------------------------------------------------------------------------------------------------- timing


class Timer:
    """Median milliseconds of ``fn`` over ``reps`` runs after ``warmup``: CUDA events on the current stream (they span
    host stalls inside ``fn`` too, the GPU waiting) and the host's clock around fn + synchronize; on a CPU the clock."""

    def __init__(self, device: torch.device, reps: int, warmup: int) -> None:
        self.cuda, self.reps, self.warmup = device.type == "cuda", reps, warmup

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def __call__(self, fn: Callable[[], object]) -> dict:
        for _ in range(self.warmup):
            fn()
        self.sync()
        events, walls = [], []
        for _ in range(self.reps):
            t0 = time.perf_counter()
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                events.append(start.elapsed_time(end))
            else:
                fn()
            walls.append((time.perf_counter() - t0) * 1e3)
        ms = statistics.median(events) if events else statistics.median(walls)
        return {"ms": round(ms, 4), "wall_ms": round(statistics.median(walls), 4), "spread_ms": round(max(events or walls) - min(events or walls), 4)}


# -------------------------------------------------------------------------------------------------------- the layer's data


def host_alias(t: torch.Tensor) -> torch.Tensor:
    """A CUDA tensor over the same bytes as the pinned host tensor ``t`` (zero-copy), as the engine makes it."""
    return device_view(t, torch.device("cuda"))


class Layer:
    """One attention layer's decode inputs: K [kv_heads, slots, D] and V in device memory, V again in (pinned) host
    memory, a shuffled block table (blocks of 16), queries, every row at ``context`` keys."""

    def __init__(self, heads: int, kv_heads: int, dim: int, dtype: torch.dtype, context: int, batch: int, device: torch.device, seed: int = 0) -> None:
        self.heads, self.kv_heads, self.dim, self.dtype, self.context, self.batch, self.device = heads, kv_heads, dim, dtype, context, batch, device
        g = torch.Generator(device=device).manual_seed(seed)
        width = context // BLOCK
        blocks = batch * width
        slots = blocks * BLOCK
        self.k = torch.randn(kv_heads, slots, dim, generator=g, device=device).to(dtype)
        self.v_dev = torch.randn(kv_heads, slots, dim, generator=g, device=device).to(dtype)
        pin = device.type == "cuda"
        self.v_host = torch.empty(kv_heads, slots, dim, dtype=dtype, pin_memory=pin)
        self.v_host.copy_(self.v_dev)  # blocking: the host copy is whole before anything reads it
        self.cache = LayerCache(self.k, self.v_host)  # as KCache's read_values sees the layer
        self.block_ids = torch.randperm(blocks, generator=g, device=device)  # [batch * width], row-major
        self.q = torch.randn(batch, heads, dim, generator=g, device=device).to(dtype)
        self.context_lens = torch.full((batch,), context, dtype=torch.long, device=device)
        self.mask = torch.ones(batch, 1, width * BLOCK, dtype=torch.bool, device=device)  # every key valid: the masking's cost only
        self.slots = (self.block_ids.view(batch, width)[..., None] * BLOCK + torch.arange(BLOCK, device=device)).flatten(1)  # [batch, context]
        self.scale = dim**-0.5
        self.alias = None
        self.alias_error = None
        if pin:
            try:
                self.alias = host_alias(self.v_host)
                probe = torch.randint(0, slots, (64,), device=device)
                assert torch.equal(self.alias[:, probe], self.v_dev[:, probe]), "the zero-copy view reads other bytes"
            except Exception as e:  # noqa: BLE001 - recorded, the variant skipped
                self.alias, self.alias_error = None, f"{type(e).__name__}: {e}"

    def v_bytes(self) -> int:
        return self.v_host.numel() * self.v_host.element_size()

    # the parts, as the engine runs them ----------------------------------------------------------------------------

    def scores(self, rows: slice | None = None) -> list[torch.Tensor]:
        """q.K^T per KV head (K gathered through the block table, scaled, masked): [B, group, context] each."""
        rows = rows or slice(0, self.batch)
        batch = rows.stop - rows.start
        width = self.context // BLOCK
        qd = self.q[rows].view(batch, self.kv_heads, self.heads // self.kv_heads, self.dim)
        ids = self.block_ids.view(self.batch, width)[rows].reshape(-1)
        out = []
        for h in range(self.kv_heads):
            keys = _gather(self.k[h], ids, batch, BLOCK)
            s = torch.bmm(qd[:, h], keys.transpose(1, 2)).mul_(self.scale)
            out.append(s.masked_fill_(~self.mask[rows], float("-inf")))
        return out

    @staticmethod
    def softmax(scores: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([s.softmax(-1, dtype=torch.float32) for s in scores], 1)  # [B, kv_heads, group, context]

    def full_values(self, probs: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
        """The full cache's weighted sum: V gathered from device memory, one bmm per KV head."""
        rows = rows or slice(0, self.batch)
        batch = rows.stop - rows.start
        ids = self.block_ids.view(self.batch, -1)[rows].reshape(-1)
        return torch.stack([torch.bmm(probs[:, h].to(self.dtype), _gather(self.v_dev[h], ids, batch, BLOCK)) for h in range(self.kv_heads)], 1)

    def select(self, method: KCache, probs: torch.Tensor, rows: slice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """KCache's Top-N (``read_values`` up to the gather): the kept probabilities [B, kv_heads, group, n] and the V rows
        they name in the flattened pool [B, kv_heads, group or 1, n]."""
        rows = rows or slice(0, self.batch)
        b, kv_heads, group, width = probs.shape
        counts = method.value_selection.counts(self.context_lens[rows])
        n = int(counts.max())
        score = probs.amax(2, keepdim=True) if method.config.per_kv_head else probs
        top = score.topk(n, dim=-1).indices
        base = torch.arange(kv_heads, device=probs.device)[:, None, None] * self.v_host.shape[1]
        picked = self.slots[rows].gather(1, top.flatten(1)).view(top.shape) + base
        p = probs.gather(-1, top.expand(b, kv_heads, group, n))
        p = p.masked_fill(torch.arange(n, device=p.device) >= counts[:, None, None, None], 0.0)
        if method.config.renormalize:
            p = p / p.sum(-1, keepdim=True)
        return p, picked

    @staticmethod
    def weighted_sum(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return (p.unsqueeze(-2) @ v.float()).squeeze(-2)

    # the V gathers ----------------------------------------------------------------------------------------------------

    def gather_sync(self, picked: torch.Tensor) -> torch.Tensor:
        """The engine before this change: indices to the host, rows into pageable memory, a synchronous copy."""
        flat = self.v_host.view(-1, self.dim)
        return flat.index_select(0, picked.flatten().cpu()).to(self.device).view(*picked.shape, -1)

    def gather_pinned(self, picked: torch.Tensor) -> torch.Tensor:
        """Rows gathered on the host into a pinned staging buffer, one asynchronous copy."""
        flat = self.v_host.view(-1, self.dim)
        index = picked.flatten().cpu()
        rows = torch.empty(index.numel(), self.dim, dtype=self.dtype, pin_memory=self.device.type == "cuda")
        torch.index_select(flat, 0, index, out=rows)
        return rows.to(self.device, non_blocking=True).view(*picked.shape, -1)

    def gather_zero_copy(self, picked: torch.Tensor) -> torch.Tensor:
        """A GPU gather reading the pinned pool in place (UVA): no host work, no sync."""
        return self.alias.view(-1, self.dim).index_select(0, picked.flatten()).view(*picked.shape, -1)

    def gather_device(self, picked: torch.Tensor) -> torch.Tensor:
        """The reference: the same rows from the device copy of V."""
        return self.v_dev.view(-1, self.dim).index_select(0, picked.flatten()).view(*picked.shape, -1)


def overlapped_step(layer: Layer, method: KCache, gather: str, halves: int = 2) -> torch.Tensor:
    """KCache's step with the batch in ``halves`` parts: each part's q.K^T, softmax and Top-N are queued before the
    previous part's V arrives. zero-copy: each part's gather runs on a side stream beside the next part's q.K^T.
    pinned: the host gathers part i while the GPU scores part i + 1 (its indices come back asynchronously)."""
    bounds = [round(i * layer.batch / halves) for i in range(halves + 1)]
    parts = [slice(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]
    main = torch.cuda.current_stream()
    pending = []
    for rows in parts:
        p, picked = layer.select(method, layer.softmax(layer.scores(rows)), rows)
        if gather == "zero-copy":
            side = _side_stream()
            side.wait_stream(main)
            with torch.cuda.stream(side):
                v = layer.gather_zero_copy(picked)
            picked.record_stream(side)
            done = torch.cuda.Event()
            done.record(side)
            pending.append((p, v, done, None))
        else:
            index = torch.empty(picked.numel(), dtype=torch.long, pin_memory=True)
            index.copy_(picked.flatten(), non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(main)
            pending.append((p, picked.shape, ready, index))
    outs = []
    for p, v, event, index in pending:
        if index is None:
            main.wait_event(event)
            v.record_stream(main)
        else:
            event.synchronize()  # this part's indices are on the host; later parts' scores are still running on the GPU
            rows = torch.empty(index.numel(), layer.dim, dtype=layer.dtype, pin_memory=True)
            torch.index_select(layer.v_host.view(-1, layer.dim), 0, index, out=rows)
            v = rows.to(layer.device, non_blocking=True).view(*v, -1)
        outs.append(layer.weighted_sum(p, v))
    return torch.cat(outs)


_SIDE: list[torch.cuda.Stream] = []


def _side_stream() -> torch.cuda.Stream:
    if not _SIDE:
        _SIDE.append(torch.cuda.Stream())
    return _SIDE[0]


def h2d_bandwidth(device: torch.device, nbytes: int, timer: Timer) -> dict:
    """The bus's host-to-device rate from pinned and from pageable memory, and the device's copy rate (read + write)."""
    src_pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).fill_(1)
    src_pageable = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst2 = torch.empty_like(dst)
    out = {}
    for name, fn, moved in (("h2d_pinned", lambda: dst.copy_(src_pinned, non_blocking=True), nbytes),
                            ("h2d_pageable", lambda: dst.copy_(src_pageable), nbytes),
                            ("d2d", lambda: dst2.copy_(dst), 2 * nbytes)):
        t = timer(fn)
        out[name] = {**t, "GB_per_s": round(moved / (t["ms"] * 1e-3) / 1e9, 1)}
    return out


def parts(shapes: dict, top_ns: list[int], device: torch.device, reps: int, warmup: int, budget_s: float = float("inf")) -> dict:
    """Per shape, context, batch and N: each part's time, and whole steps (full cache, KCache with each gather, overlapped).
    Shapes not started within ``budget_s`` seconds are skipped (and listed)."""
    timer = Timer(device, reps, warmup)
    rows, skipped, deadline = [], [], time.perf_counter() + budget_s
    for name, (heads, kv_heads, dim, dtype, grid) in shapes.items():
        for context, batch in grid:
            if time.perf_counter() > deadline:
                skipped.append({"shape": name, "context": context, "batch": batch})
                continue
            rows += measure_layer(name, Layer(heads, kv_heads, dim, dtype, context, batch, device), top_ns, timer)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                if hasattr(torch._C, "_host_emptyCache"):  # the pinned pools of the last shape go back
                    torch._C._host_emptyCache()
    bw = h2d_bandwidth(device, 256 << 20, timer) if device.type == "cuda" else None
    return {"reps": reps, "warmup": warmup, "bandwidth": bw, "rows": rows, "skipped_for_time": skipped}


def measure_layer(name: str, layer: Layer, top_ns: list[int], timer: Timer) -> list[dict]:
    started = time.perf_counter()
    base = {"shape": name, "heads": layer.heads, "kv_heads": layer.kv_heads, "head_dim": layer.dim, "dtype": str(layer.dtype).removeprefix("torch."),
            "context": layer.context, "batch": layer.batch, "v_pool_bytes": layer.v_bytes(), "zero_copy_error": layer.alias_error}
    scores = layer.scores()
    probs = layer.softmax(scores)
    base |= {"qk_ms": timer(layer.scores), "softmax_ms": timer(lambda: layer.softmax(scores)),
             "full_weighted_sum_ms": timer(lambda: layer.full_values(probs)),
             "full_step_ms": timer(lambda: layer.full_values(layer.softmax(layer.scores())))}
    dense = layer.full_values(probs).float()
    rows = []
    for n in top_ns:
        r = measure_top_n(layer, KCache(KCacheConfig(top_n=n)), probs, dense, timer)
        r = {**base, **r, "seconds": round(time.perf_counter() - started, 1)}
        rows.append(r)
        print(_row_line(r), flush=True)
    return rows


def measure_top_n(layer: Layer, method: KCache, probs: torch.Tensor, dense: torch.Tensor, timer: Timer) -> dict:
    """KCache's parts and whole steps at one N; every gather and step checked against the rows read from device memory."""
    p, picked = layer.select(method, probs)
    v_ref = layer.gather_device(picked)
    ref = layer.weighted_sum(p, v_ref)
    transferred = picked.numel() * layer.dim * layer.v_host.element_size()
    r = {"top_n": method.config.top_n, "v_rows_per_step": picked.numel(), "v_bytes_per_step": transferred,
         "topk_ms": timer(lambda: layer.select(method, probs)), "weighted_sum_ms": timer(lambda: layer.weighted_sum(p, v_ref)),
         "rel_err_vs_full": ((ref - dense).norm() / dense.norm()).item()}

    def engine() -> torch.Tensor:  # the engine's read_values: Top-N, gather + transfer and weighted sum together
        return method.read_values(probs, layer.cache, layer.slots, layer.context_lens)

    r["engine_read_values_ms"] = timer(engine)
    r["engine_max_abs_err"] = (engine() - ref).abs().max().item()
    gathers = {"sync": layer.gather_sync, "pinned": layer.gather_pinned}
    if layer.alias is not None:
        gathers["zero-copy"] = layer.gather_zero_copy
    for g, gather in gathers.items():
        t = timer(functools.partial(gather, picked))
        r[f"gather_{g}_ms"] = t
        r[f"gather_{g}_GB_per_s"] = round(transferred / (t["ms"] * 1e-3) / 1e9, 2)
        r[f"gather_{g}_max_abs_err"] = (gather(picked).float() - v_ref.float()).abs().max().item()
    steps = {"kcache_engine": lambda: method.read_values(layer.softmax(layer.scores()), layer.cache, layer.slots, layer.context_lens),
             "kcache_sync": functools.partial(_kcache_step, layer, method, layer.gather_sync),
             "kcache_pinned": functools.partial(_kcache_step, layer, method, layer.gather_pinned)}
    if layer.alias is not None:
        steps["kcache_zero_copy"] = functools.partial(_kcache_step, layer, method, layer.gather_zero_copy)
    if layer.device.type == "cuda":
        steps["kcache_overlap_pinned"] = functools.partial(overlapped_step, layer, method, "pinned")
        if layer.alias is not None:
            steps["kcache_overlap_zero_copy"] = functools.partial(overlapped_step, layer, method, "zero-copy")
    for s, fn in steps.items():
        r[f"{s}_step_ms"] = timer(fn)
        r[f"{s}_step_max_abs_err"] = (fn() - ref).abs().max().item()
    return r


def device_agreement(model: str, config: dict, prompt_len: int, steps: int, swap_space: float) -> dict:
    """KCache with N < context (sums of V beside K on the GPU, V in pinned host memory) against the same engine on the
    CPU: the largest logit difference and the first step whose greedy token differs, from one random prompt."""
    from kcache import greedy_logits
    from sliding_window import random_prompts

    from kvtier import LLM

    runs = {}
    for dev in ("cpu", "cuda"):
        llm = LLM(model, dtype="float32", kv_cache_memory=1 << 26, device=dev, swap_space=swap_space, kv_method="kcache", kv_method_config=config)
        prompt = random_prompts(1, prompt_len, llm.engine.model_config.vocab_size, seed=0)[0]
        tokens, logits = greedy_logits(llm, prompt, steps)
        runs[dev] = (tokens, logits.cpu())
        del llm
    (cpu_tokens, cpu), (gpu_tokens, gpu) = runs["cpu"], runs["cuda"]
    same = next((i for i, (a, b) in enumerate(zip(cpu_tokens, gpu_tokens)) if a != b), len(cpu_tokens))
    until = max(1, same)  # logits compared while both runs saw the same tokens
    return {"config": config, "prompt_len": prompt_len, "steps": steps, "max_abs_logit_diff": (gpu[:until] - cpu[:until]).abs().max().item(),
            "same_tokens_steps": same}


def _kcache_step(layer: Layer, method: KCache, gather: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    p, picked = layer.select(method, layer.softmax(layer.scores()))
    return layer.weighted_sum(p, gather(picked))


def _ms(r: dict, key: str) -> str:
    v = r.get(key)
    return "-" if v is None else f"{v['ms']:.3f}"


def _row_line(r: dict) -> str:
    return (f"{r['shape']} ctx {r['context']} batch {r['batch']} N {r['top_n']}: full {_ms(r, 'full_step_ms')} ms, kcache engine "
            f"{_ms(r, 'kcache_engine_step_ms')} / pinned {_ms(r, 'kcache_pinned_step_ms')} / zero-copy {_ms(r, 'kcache_zero_copy_step_ms')} / "
            f"overlap {_ms(r, 'kcache_overlap_pinned_step_ms')}, {_ms(r, 'kcache_overlap_zero_copy_step_ms')} ms ({r['seconds']} s)")


# ---------------------------------------------------------------------------------------------------------------- report


def report(result: dict) -> str:
    lines = [f"KCache on a GPU; {result['machine']}", ""]
    if "exactness" in result:
        tol = result["tolerance"]
        lines += [f"Exactness through the engine on {result['device']}, N >= context (fp32, greedy, random prompt; pass: max abs logit diff "
                  f"<= {tol:g} and the same tokens):", "", "| model | heads / KV heads | config | steps | max abs logit diff | same tokens | pass |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {r['model']} | {r['heads']} / {r['kv_heads']} | `{r['config']}` | {r['steps']} | {r['max_abs_logit_diff']:.2e} | "
                  f"{r['same_tokens']} | {r['pass']} |" for r in result["exactness"]]
        lines.append("")
    if "agreement" in result:
        a = result["agreement"]
        lines += [f"KCache `{a['config']}` on the GPU against the CPU engine ({a['prompt_len']}-token random prompt, {a['steps']} greedy steps): "
                  f"max abs logit diff {a['max_abs_logit_diff']:.2e} over the steps both chose the same tokens; the same tokens for "
                  f"{a['same_tokens_steps']} of {a['steps']} steps.", ""]
    if "parts" in result:
        pr = result["parts"]
        if pr.get("bandwidth"):
            lines += ["Copy rates (256 MiB): " + ", ".join(f"{k} {v['GB_per_s']} GB/s" for k, v in pr["bandwidth"].items()), ""]
        lines += [f"One layer's decode attention, parts (ms, median of {pr['reps']} CUDA-event timings; N per query head; gathers: "
                  "sync = indices to host, pageable rows, blocking copy; pinned = rows into a pinned buffer, async copy; "
                  "zero-copy = GPU index_select on host memory (UVA)):", "",
                  "| shape | context | batch | N | V MiB/step | q.K^T | softmax | Top-N | gather sync | gather pinned | gather zero-copy | "
                  "weighted sum | full: V sum |", "| --- |" + " --- |" * 12]
        for r in pr["rows"]:
            lines.append(f"| {r['shape']} | {r['context']} | {r['batch']} | {r['top_n']} | {r['v_bytes_per_step'] / 2**20:.2f} | {_ms(r, 'qk_ms')} | "
                         f"{_ms(r, 'softmax_ms')} | {_ms(r, 'topk_ms')} | {_ms(r, 'gather_sync_ms')} | {_ms(r, 'gather_pinned_ms')} | "
                         f"{_ms(r, 'gather_zero-copy_ms')} | {_ms(r, 'weighted_sum_ms')} | {_ms(r, 'full_weighted_sum_ms')} |")
        lines += ["", "Whole step of one layer (ms; x full = the KCache step over the full cache's; overlap: the batch in two halves, "
                  "one half's V gather beside the other's q.K^T):", "",
                  "| shape | context | batch | N | full cache | kcache engine | kcache sync | kcache pinned | kcache zero-copy | "
                  "overlap pinned | overlap zero-copy | best x full | max abs err |", "| --- |" + " --- |" * 12]
        keys = ("kcache_engine", "kcache_sync", "kcache_pinned", "kcache_zero_copy", "kcache_overlap_pinned", "kcache_overlap_zero_copy")
        for r in pr["rows"]:
            best = min(r[f"{k}_step_ms"]["ms"] for k in keys if f"{k}_step_ms" in r)
            err = max(r[f"{k}_step_max_abs_err"] for k in keys if f"{k}_step_max_abs_err" in r)
            lines.append(f"| {r['shape']} | {r['context']} | {r['batch']} | {r['top_n']} | {_ms(r, 'full_step_ms')} | "
                         + " | ".join(_ms(r, f"{k}_step_ms") for k in keys) + f" | {best / r['full_step_ms']['ms']:.2f} | {err:.1e} |")
        if pr.get("skipped_for_time"):
            lines += ["", "Skipped for time: " + ", ".join(f"{s['shape']} {s['context']} x {s['batch']}" for s in pr["skipped_for_time"])]
        errors = {r["zero_copy_error"] for r in pr["rows"] if r["zero_copy_error"]}
        if errors:
            lines += ["", "Zero-copy not run: " + "; ".join(sorted(errors))]
        lines.append("")
    if "throughput" in result:
        lines += [f"Decode throughput at 4K on {result['device']}, device KV budget of {result['full_seqs']} full-cache sequences, each cache at "
                  "its largest batch (decode-only steps; median of repeats):", "",
                  "| context | cache | batch | peak decoding | decode tok/s | x full |", "| --- | --- | --- | --- | --- | --- |"]
        rows = result["throughput"]
        by_cache: dict[tuple[int, str], list[dict]] = {}
        for r in rows:
            by_cache.setdefault((r["context"], r["cache"]), []).append(r)
        med = {k: statistics.median(x["decode_only_tokens_per_s"] or 0.0 for x in rs) for k, rs in by_cache.items()}
        for (context, cache), rs in by_cache.items():
            full = med.get((context, "full cache")) or float("nan")
            lines.append(f"| {context} | {cache} | {rs[0]['largest_batch']} | {rs[0]['peak_decoding']} | {med[(context, cache)]} | "
                         f"{med[(context, cache)] / full:.2f} |")
        lines.append("")
    for section, err in result.get("errors", {}).items():
        lines += [f"Section {section} failed: {err.strip().splitlines()[-1]}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="kvtier-tiny")
    p.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    p.add_argument("--tolerance", type=float, default=1e-5, help="exactness: the largest logit difference that passes (fp32)")
    p.add_argument("--steps", type=int, default=256, help="exactness: greedy steps after a 256-token prompt")
    p.add_argument("--top-ns", nargs="+", type=int, default=[64, 256], help="parts: V rows per query head")
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--smoke", action="store_true", help="parts at toy sizes (for a CPU)")
    p.add_argument("--parts-budget-s", type=float, default=75.0, help="parts: shapes not started within this many seconds are skipped")
    p.add_argument("--full-seqs", type=int, default=16, help="throughput: the device budget, what this many full-cache 4K sequences need")
    p.add_argument("--top-n", type=int, default=64, help="throughput: KCache's N")
    p.add_argument("--max-tokens", type=int, default=128, help="throughput: decoded per request")
    p.add_argument("--repeats", type=int, default=3, help="throughput: runs of each cache, interleaved")
    p.add_argument("--swap-space", type=float, default=0.25,
                   help="GiB of each engine's swap pool (pinned beside a GPU; the default 4 GiB per engine is slow to pin, and no run here preempts)")
    p.add_argument("--json-out", type=Path)
    p.add_argument("--markdown-out", type=Path)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu for the smoke test")
    device = torch.device(args.device)
    result: dict = {"machine": machine_line(), "device": args.device, "model": args.model, "torch": torch.__version__, "errors": {}}
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name()
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 stays fp32 (torch's default; said for the record)
    started = time.perf_counter()

    def section(name: str, fn: Callable[[], None]) -> None:
        t0 = time.perf_counter()
        try:
            fn()
        except Exception:  # noqa: BLE001 - one section's failure leaves the others' figures
            result["errors"][name] = traceback.format_exc()
            print(result["errors"][name], file=sys.stderr, flush=True)
        result.setdefault("section_seconds", {})[name] = round(time.perf_counter() - t0, 1)
        print(f"section {name}: {result['section_seconds'][name]} s", flush=True)
        if args.json_out:  # what is done so far survives a later timeout
            args.json_out.write_text(json.dumps(result, indent=1) + "\n")
        if args.markdown_out:
            args.markdown_out.write_text(report(result) + "\n")

    if "exactness" in args.sections:
        def exact() -> None:
            from kcache import exactness

            with tempfile.TemporaryDirectory() as tmp:
                mha = build_random_checkpoint(Path(tmp) / "mha", hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                              intermediate_size=256, vocab_size=512, tokenizer_vocab_size=512, max_position_embeddings=1024)
                rows = exactness({args.model: args.model, "random MHA Llama": str(mha)}, 256, args.steps, device=args.device, swap_space=args.swap_space)
            result["tolerance"] = args.tolerance
            result["exactness"] = [{**r, "pass": r["max_abs_logit_diff"] <= args.tolerance and r["same_tokens"]} for r in rows]
            if device.type == "cuda":
                result["agreement"] = device_agreement(args.model, {"top_n": args.top_n, "residual": True}, 1024, 64, args.swap_space)
        section("exactness", exact)
    if "parts" in args.sections:
        shapes = {k: v for k, v in (SMOKE if args.smoke else SHAPES).items() if k in args.shapes}
        section("parts", lambda: result.__setitem__("parts", parts(shapes, args.top_ns, device, args.reps, args.warmup, args.parts_budget_s)))
    if "throughput" in args.sections:
        def tput() -> None:
            from kcache import throughput

            result["full_seqs"] = args.full_seqs
            result["throughput"] = throughput(args.model, [4096], args.full_seqs, args.max_tokens, args.top_n, args.repeats, device=args.device,
                                              swap_space=args.swap_space)
        section("throughput", tput)
    result["seconds"] = round(time.perf_counter() - started)
    write_report(result, report(result), args.json_out, args.markdown_out)
    return 1 if result["errors"] or not all(r["pass"] for r in result.get("exactness", [])) else 0


if __name__ == "__main__":
    sys.exit(main())
