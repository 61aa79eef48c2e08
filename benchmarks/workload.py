"""A fixed-seed ShareGPT-like workload: prompt and output lengths drawn from lognormals.

ShareGPT conversations have long-tailed prompt and reply lengths; a lognormal with a median and
a spread (sigma) reproduces that shape without shipping the data set. Token ids are random
(the benchmarks use random-weight models, so content does not matter, lengths do).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Request:
    prompt_token_ids: list[int]
    output_len: int


def add_workload_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload (ShareGPT-like lognormal)")
    g.add_argument("--num-prompts", type=int, default=1000)
    g.add_argument("--prompt-median", type=float, default=64.0)
    g.add_argument("--prompt-sigma", type=float, default=0.8)
    g.add_argument("--output-median", type=float, default=64.0)
    g.add_argument("--output-sigma", type=float, default=0.8)
    g.add_argument("--max-len", type=int, default=512, help="clip prompt and output lengths to this many tokens")
    g.add_argument("--seed", type=int, default=0)


def lognormal_lengths(rng: np.random.Generator, n: int, median: float, sigma: float, max_len: int) -> np.ndarray:
    return np.clip(np.round(rng.lognormal(np.log(median), sigma, n)), 4, max_len).astype(int)


def make_workload(args: argparse.Namespace, vocab_size: int) -> list[Request]:
    rng = np.random.default_rng(args.seed)
    plens = lognormal_lengths(rng, args.num_prompts, args.prompt_median, args.prompt_sigma, args.max_len)
    olens = lognormal_lengths(rng, args.num_prompts, args.output_median, args.output_sigma, args.max_len)
    return [Request(rng.integers(3, vocab_size, int(p)).tolist(), int(o)) for p, o in zip(plens, olens)]


def describe(reqs: list[Request]) -> str:
    p = np.array([len(r.prompt_token_ids) for r in reqs])
    o = np.array([r.output_len for r in reqs])
    return (f"{len(reqs)} requests; prompt len mean {p.mean():.1f} median {np.median(p):.0f} max {p.max()}; "
            f"output len mean {o.mean():.1f} median {np.median(o):.0f} max {o.max()}")
