"""From logits to next tokens: penalties, temperature, top-k / top-p / min-p, seeded sampling, logprobs.

Logprobs are reported from the raw model distribution (before penalties and temperature), as
vLLM does. A row with a seed samples with its own generator drawing one fixed-size noise vector
per step (the exponential race, argmax p / E with E ~ Exp(1)), so its tokens depend only on
its seed and its history, never on which other rows share the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvtier.sampling_params import SamplingParams

TokenLogprobs = dict[int, tuple[float, int]]  # token id -> (logprob, 1-based rank)


@dataclass
class SamplingRow:
    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    generator: torch.Generator | None = None
    banned_token_ids: Sequence[int] = ()


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]


def compute_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, k: int) -> list[TokenLogprobs]:
    """Per row: the chosen token's logprob and rank plus the ``k`` most likely tokens."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(1, token_ids[:, None]).squeeze(1)
    ranks = (lp > chosen[:, None]).sum(-1) + 1
    top_vals, top_ids = lp.topk(k, dim=-1) if k > 0 else (lp[:, :0], token_ids[:, None][:, :0])
    out = []
    for i, (tok, c, r) in enumerate(zip(token_ids.tolist(), chosen.tolist(), ranks.tolist())):
        entry = {t: (v, j + 1) for j, (t, v) in enumerate(zip(top_ids[i].tolist(), top_vals[i].tolist()))}
        entry[tok] = (c, r)
        out.append(entry)
    return out


def _needs_penalty(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    """In place: CTRL repetition penalty over prompt + output, OpenAI presence/frequency over output."""
    vocab = logits.shape[1]
    for i, row in enumerate(rows):
        p = row.params
        if not _needs_penalty(p):
            continue
        x = logits[i]
        out_ids = torch.tensor(list(row.output_token_ids), dtype=torch.long, device=x.device)
        counts = torch.zeros(vocab, device=x.device).scatter_add_(0, out_ids, torch.ones_like(out_ids, dtype=torch.float))
        if p.repetition_penalty != 1.0:
            seen = counts > 0
            if row.prompt_token_ids:
                seen[torch.tensor(list(row.prompt_token_ids), dtype=torch.long, device=x.device)] = True
            x[seen] = torch.where(x[seen] > 0, x[seen] / p.repetition_penalty, x[seen] * p.repetition_penalty)
        x -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()


def filter_distribution(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Probabilities after temperature, top-k, top-p (the smallest set reaching p) and min-p."""
    logits = logits / temperature[:, None]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[1]
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab)).clamp(max=vocab)
    rank = torch.arange(vocab, device=logits.device)[None, :]
    sorted_logits = sorted_logits.masked_fill(rank >= k[:, None], float("-inf"))
    probs = sorted_logits.softmax(-1)
    before = probs.cumsum(-1) - probs  # mass strictly above each token
    drop = (before >= top_p[:, None]) & (rank > 0)
    drop |= probs < (min_p[:, None] * probs[:, :1])
    probs = probs.masked_fill(drop, 0.0)
    probs = probs / probs.sum(-1, keepdim=True)
    return torch.zeros_like(probs).scatter_(1, order, probs)


class Sampler:
    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SampleResult:
        simple = all(r.params.is_greedy and not _needs_penalty(r.params) and not r.banned_token_ids for r in rows)
        if simple:
            tokens = logits.argmax(-1)
        else:
            tokens = self._sample(logits.float().clone(), rows)
        token_list = tokens.tolist()
        logprobs: list[TokenLogprobs | None] = [None] * len(rows)
        wanted = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        if wanted:
            k = max(rows[i].params.logprobs for i in wanted)
            idx = torch.tensor(wanted, device=logits.device)
            entries = compute_logprobs(logits[idx], tokens[idx], k)
            for i, entry in zip(wanted, entries):
                keep = rows[i].params.logprobs
                chosen = token_list[i]
                logprobs[i] = {t: v for t, v in entry.items() if v[1] <= keep or t == chosen}
        return SampleResult(token_list, logprobs)

    def _sample(self, x: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        apply_penalties(x, rows)
        for i, r in enumerate(rows):
            if r.banned_token_ids:
                x[i, torch.tensor(list(r.banned_token_ids), dtype=torch.long, device=x.device)] = float("-inf")
        tokens = x.argmax(-1)
        rand = [i for i, r in enumerate(rows) if not r.params.is_greedy]
        if not rand:
            return tokens
        dev = x.device
        sub = [rows[i].params for i in rand]
        probs = filter_distribution(
            x[torch.tensor(rand, device=dev)],
            torch.tensor([p.temperature for p in sub], device=dev),
            torch.tensor([p.top_k for p in sub], device=dev),
            torch.tensor([p.top_p for p in sub], device=dev),
            torch.tensor([p.min_p for p in sub], device=dev),
        )
        noise = torch.empty_like(probs)
        for j, i in enumerate(rand):
            noise[j].exponential_(generator=rows[i].generator)
        tokens[torch.tensor(rand, device=dev)] = (probs / noise).argmax(-1)
        return tokens
