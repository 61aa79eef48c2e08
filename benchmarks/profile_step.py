"""One decode step and one prefill step of kvtier, broken into their parts, and the model's matmul FLOP rate against
the machine's.

On the throughput benchmark's reference Llama (fp32): ``--batch`` sequences of ``--context`` prompt tokens are brought
to decoding, then ``--steps`` decode steps are timed part by part (scheduling, the attention metadata, the model's
forward and within it attention and everything else, the logits, sampling, and the engine's bookkeeping), then one
prefill step of a ``--prefill``-token prompt the same way. A second pass under torch.profiler gives the forward's
operator table. The FLOP rate counts the decode step's matmul FLOPs (2 x batch x every linear layer's weights, the
LM head included) over the time of the matmul operators, and sets it beside the rate of a large fp32 matmul on the
same threads (best of 5).

    python benchmarks/profile_step.py                       # batch 256 at 128 tokens, as the throughput benchmark peaks
    python benchmarks/profile_step.py --batch 32 --json-out benchmarks/results/profile-step-cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import reference_model  # noqa: E402

from kvtier.config import EngineArgs  # noqa: E402
from kvtier.engine.llm_engine import LLMEngine  # noqa: E402
from kvtier.machine import machine_line  # noqa: E402
from kvtier.models.packed_linear import PackedLinear  # noqa: E402
from kvtier.sampling_params import SamplingParams  # noqa: E402

MATMUL_OPS = ("aten::addmm", "aten::mm", "aten::bmm", "aten::matmul", "aten::linear", "mkldnn::_linear_pointwise")


class PartTimer:
    """Wall time of named calls, wrapped on their owners' instances (the engine's code is not touched)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, owner: object, attr: str, name: str) -> None:
        fn: Callable = getattr(owner, attr)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - start

        setattr(owner, attr, timed)


def instrument(engine: LLMEngine) -> PartTimer:
    t = PartTimer()
    t.wrap(engine.scheduler, "schedule", "schedule")
    t.wrap(engine.runner.backend, "plan", "attention metadata")
    t.wrap(engine.runner.model, "forward", "model forward")
    t.wrap(engine.runner.backend, "forward", "  attention")
    t.wrap(engine.runner.model, "compute_logits", "logits")
    t.wrap(engine, "_sample", "sampling")
    return t


def timed_steps(engine: LLMEngine, timer: PartTimer, steps: int) -> dict:
    """Mean milliseconds per step of each part over ``steps`` engine steps; "bookkeeping" is the step's remainder."""
    timer.seconds.clear()
    totals = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        totals.append(time.perf_counter() - start)
    parts = {k: 1e3 * v / steps for k, v in timer.seconds.items()}
    parts["  other model work"] = parts["model forward"] - parts.get("  attention", 0.0)
    total = 1e3 * statistics.mean(totals)
    parts["bookkeeping"] = total - sum(v for k, v in parts.items() if not k.startswith("  "))
    return {"step_ms": total, "step_ms_median": 1e3 * statistics.median(totals), "parts_ms": parts}


def operator_table(engine: LLMEngine, steps: int, top: int) -> tuple[list[dict], float]:
    """The forward's operators by self CPU time over ``steps`` steps (ms per step), and the matmuls' share (ms per step)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            engine.step()
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    table = [{"op": e.key, "calls_per_step": e.count / steps, "self_ms_per_step": e.self_cpu_time_total / 1e3 / steps} for e in rows[:top]]
    matmul_ms = sum(e.self_cpu_time_total for e in rows if e.key in MATMUL_OPS) / 1e3 / steps
    return table, matmul_ms


def machine_matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _timed(fn: Callable) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def linear_weights(engine: LLMEngine) -> int:
    """Weights every token multiplies: each nn.Linear's, the LM head included (tied or not)."""
    return sum(m.weight.numel() for m in engine.runner.model.modules() if isinstance(m, (torch.nn.Linear, PackedLinear)))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="HF checkpoint folder (default: the reference Llama)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--attention-backend", default="auto", help="kvtier's attention backend (auto, cpu or paged)")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--top", type=int, default=15, help="operators listed")
    p.add_argument("--json-out", type=Path, default=None)
    args = p.parse_args(argv)
    model = args.model or reference_model(Path(".cache/reference-llama"))
    engine = LLMEngine(EngineArgs(model=str(model), dtype="float32", max_num_seqs=args.batch, max_num_batched_tokens=args.max_num_batched_tokens,
                                  enable_prefix_caching=False, attention_backend=args.attention_backend))
    vocab = engine.model_config.vocab_size
    gen = torch.Generator().manual_seed(0)
    long = SamplingParams(temperature=0.0, max_tokens=10_000, ignore_eos=True)
    for i in range(args.batch):
        engine.add_request({"prompt_token_ids": torch.randint(3, vocab, (args.context,), generator=gen).tolist()}, long, f"d{i}")
    for _ in range(-(-args.batch * args.context // args.max_num_batched_tokens) + 3):  # every prompt in, then a few decode steps
        engine.step()
    timer = instrument(engine)
    result = {"machine": machine_line(), "model": str(model), "batch": args.batch, "context": args.context, "attention_backend": engine.attention.name}
    result["decode"] = timed_steps(engine, timer, args.steps)
    result["decode"]["operators"], matmul_ms = operator_table(engine, max(2, args.steps // 4), args.top)
    flops = 2 * args.batch * linear_weights(engine)
    peak = machine_matmul_gflops()
    result["flops"] = {"matmul_gflop_per_step": flops / 1e9, "matmul_ms_per_step": matmul_ms,
                       "achieved_gflops_in_matmuls": flops / matmul_ms / 1e6, "achieved_gflops_over_step": flops / result["decode"]["step_ms"] / 1e6,
                       "machine_matmul_gflops": peak}
    for i in range(args.batch):
        engine.abort_request(f"d{i}")
    engine.add_request({"prompt_token_ids": torch.randint(3, vocab, (args.prefill,), generator=gen).tolist()},
                       SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True), "prefill")
    result["prefill"] = {"tokens": min(args.prefill, args.max_num_batched_tokens), **timed_steps(engine, timer, 1)}
    print(f"machine: {result['machine']}; attention backend {engine.attention.name}")
    for name in ("decode", "prefill"):
        r = result[name]
        shape = f"batch {args.batch}, context {args.context}" if name == "decode" else f"{r['tokens']} tokens"
        print(f"\n{name}: {r['step_ms']:.1f} ms a step ({shape})")
        for part, ms in r["parts_ms"].items():
            print(f"  {part:<24} {ms:8.2f} ms  {ms / r['step_ms']:6.1%}")
    print("\ndecode operators (self time, ms a step):")
    for row in result["decode"]["operators"]:
        print(f"  {row['op']:<40} {row['self_ms_per_step']:8.2f}  x{row['calls_per_step']:.0f}")
    f = result["flops"]
    print(f"\nmatmul FLOPs: {f['matmul_gflop_per_step']:.2f} GFLOP a decode step; {f['achieved_gflops_in_matmuls']:.1f} GFLOP/s inside the matmuls "
          f"({f['achieved_gflops_in_matmuls'] / peak:.0%} of the machine's {peak:.1f}), {f['achieved_gflops_over_step']:.1f} GFLOP/s over the "
          f"whole step ({f['achieved_gflops_over_step'] / peak:.0%})")
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
