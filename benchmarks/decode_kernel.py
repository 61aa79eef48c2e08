"""One layer's decode attention for a batch of sequences whose blocks lie scattered in a large pool: the reference
backend's gather and matmuls against the ``cpu`` backend's C++ kernel, the pool on ordinary pages and on transparent
huge pages. Reports milliseconds (best of ``--repeats``) and the K and V bytes read per second.

    python benchmarks/decode_kernel.py --json-out benchmarks/results/decode-kernel-cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import types
from pathlib import Path

import torch

from kvtier.attention.cpu import CpuPagedBackend
from kvtier.attention.metadata import ScheduledTokens
from kvtier.attention.paged import PagedAttentionBackend
from kvtier.cache import huge_pages
from kvtier.machine import machine_line


def pool(shape: tuple[int, ...], huge: bool, gen: torch.Generator) -> torch.Tensor:
    t = huge_pages.zeros(*shape, dtype=torch.float32, device=torch.device("cpu")) if huge else torch.zeros(*shape)
    return t.normal_(generator=gen)


def best_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--median-context", type=float, default=148.0, help="contexts drawn lognormal (sigma 0.6) around this, in [5, 1000]")
    p.add_argument("--pool-blocks", type=int, default=24576, help="blocks of 16 in the pool the sequences' blocks are drawn from")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--json-out", type=Path, default=None)
    args = p.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    bs, dim = 16, args.head_dim
    ctx = (torch.empty(args.batch).log_normal_(float(torch.tensor(args.median_context).log()), 0.6, generator=gen)
           .long().clamp(5, 1000).sort().values)
    width = int((ctx.max() + bs - 1) // bs)
    if args.batch * width >= args.pool_blocks:
        sys.exit(f"--pool-blocks must exceed batch x widest table ({args.batch * width}), got {args.pool_blocks}")
    tables = (torch.randperm(args.pool_blocks - 1, generator=gen)[: args.batch * width] + 1).view(args.batch, width)
    q = torch.randn(args.batch, args.heads, dim, generator=gen)
    # each backend's own layout of the step: the reference groups rows of similar length, the kernel takes one group
    seqs = [ScheduledTokens(i, [0], int(n) - 1, (tables[i].tolist(),)) for i, n in enumerate(ctx.tolist())]
    cpu = torch.device("cpu")

    def step(backend: PagedAttentionBackend, cache: types.SimpleNamespace):
        """One layer's decode attention for every sequence, laid out and called as the backend does in the engine."""
        groups = backend.plan(seqs, bs, {0: None}, cpu)[1][0].decode_groups
        return lambda: torch.cat([backend.decode(q[g.start : g.start + g.size], cache, g, dim**-0.5) for g in groups])

    gbytes = int(ctx.sum()) * args.kv_heads * dim * 4 * 2 / 1e9
    result = {"machine": machine_line(), "args": vars(args) | {"json_out": str(args.json_out)}, "kv_gbytes_read": gbytes, "runs": []}
    print(f"machine: {result['machine']}\n{args.batch} sequences, context median {int(ctx.median())} max {int(ctx.max())}; "
          f"{gbytes * 1e3:.1f} MB of K and V read\n\n| pages | path | ms | GB/s |\n| --- | --- | --- | --- |")
    for huge in (False, True):
        shape = (args.kv_heads, args.pool_blocks * bs, dim)
        cache = types.SimpleNamespace(k=pool(shape, huge, gen), v=pool(shape, huge, gen))
        for name, backend in (("reference (gather + matmul, grouped by length)", PagedAttentionBackend()), ("cpu kernel", CpuPagedBackend())):
            ms = best_ms(step(backend, cache), args.repeats)
            result["runs"].append({"huge_pages": huge, "path": name, "ms": ms, "gbytes_per_s": gbytes / ms * 1e3})
            print(f"| {'2 MiB (advised)' if huge else '4 KiB'} | {name} | {ms:.2f} | {gbytes / ms * 1e3:.1f} |")
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
