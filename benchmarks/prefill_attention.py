"""Prefill attention on the CPU: kvtier's (SDPA on 4-D views with ``enable_gqa``, torch's blocked flash kernel) against an
explicit matmul and masked softmax per KV head (the query heads of a group folded into the query axis, what kvtier did
before), fp32, one chunk of a sequence over its context, at several chunk and context lengths.

    python benchmarks/prefill_attention.py --json-out benchmarks/results/prefill-attention-cpu.json
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import torch
from decode_kernel import best_ms

from kvtier.attention.paged import prefill_attention
from kvtier.machine import machine_line


def matmul_softmax(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """The baseline: q [Lq, H, D], k/v [Hkv, L, D], mask [Lq, L] -> [Lq, H, D] with every score materialised."""
    lq, heads, dim = q.shape
    kv_heads = k.shape[0]
    group = heads // kv_heads
    qp = q.view(lq, kv_heads, group, dim).permute(1, 2, 0, 3).reshape(kv_heads, group * lq, dim)
    scores = torch.bmm(qp, k.transpose(1, 2)).mul_(scale).view(kv_heads, group, lq, -1)
    probs = scores.masked_fill_(~mask, float("-inf")).softmax(-1)
    out = torch.bmm(probs.view(kv_heads, group * lq, -1), v)
    return out.view(kv_heads, group, lq, dim).permute(2, 0, 1, 3).reshape(lq, heads, dim)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--json-out", type=Path)
    args = p.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    rows = []
    print(f"machine: {machine_line()}; {args.heads} heads, {args.kv_heads} KV heads, head dim {args.head_dim}, fp32")
    for lq, ctx in ((83, 83), (300, 300), (90, 346), (512, 512), (64, 1024), (2048, 2048)):
        q = torch.randn(lq, args.heads, args.head_dim, generator=g)
        k, v = (torch.randn(args.kv_heads, ctx, args.head_dim, generator=g) for _ in range(2))
        mask = torch.ones(lq, ctx, dtype=torch.bool).tril(ctx - lq)
        causal = None if lq == ctx else mask  # what the engine passes: no mask for a plain causal chunk
        scale = args.head_dim**-0.5
        err = (prefill_attention(q, k, v, causal, scale) - matmul_softmax(q, k, v, mask, scale)).abs().max().item()
        sdpa = best_ms(functools.partial(prefill_attention, q, k, v, causal, scale), args.repeats)
        base = best_ms(functools.partial(matmul_softmax, q, k, v, mask, scale), args.repeats)
        rows.append({"chunk": lq, "context": ctx, "sdpa_ms": sdpa, "matmul_softmax_ms": base, "ratio": sdpa / base, "max_abs_diff": err})
        print(f"chunk {lq:5d} over {ctx:5d}: sdpa {sdpa:7.2f} ms, matmul + softmax {base:7.2f} ms, ratio {sdpa / base:.2f} (max diff {err:.1e})")
    if args.json_out:
        args.json_out.write_text(json.dumps({"machine": machine_line(), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
