"""From logits to next tokens: logits processors, penalties, banned tokens, temperature, top-k / top-p / min-p, seeded
sampling, logprobs.

Logprobs come from the raw model distribution (before penalties and temperature), as vLLM
reports them. Random rows sample by the exponential race, argmax(p / E) with E ~ Exp(1), which
draws p exactly. A row with its own generator draws one vocab-sized noise vector from it per
step, so its tokens depend only on its seed and history, never on the rest of the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch

from kvtier.errors import InvalidArgumentError
from kvtier.sampling_params import SamplingParams, processor_arity

TokenLogprobs = dict[int, tuple[float, int]]  # token id -> (logprob, 1-based rank in the distribution)


@dataclass
class SamplingRow:
    """What the sampler needs to know about the sequence behind one row of the logits."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]  # generated so far
    generator: torch.Generator | None = None  # set when params.seed is; on the logits' device
    banned_token_ids: Sequence[int] = ()  # forced to -inf (the engine bans EOS/stop ids until min_tokens)


@dataclass
class SampleResult:
    """One token per row; per row logprobs, or None where ``params.logprobs`` is None."""

    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]


def _logprob_entries(logits: torch.Tensor, token_ids: torch.Tensor, ks: Sequence[int]) -> list[TokenLogprobs]:
    """Per row: the chosen token first, then the row's ``ks[i]`` most likely tokens.

    Ranks are competition ranks (1 + the number of strictly more likely tokens), so a token
    has the same rank whether it was chosen, listed in the top, or both.
    """
    lp = torch.log_softmax(logits.float(), dim=-1)
    token_ids = token_ids.to(device=lp.device, dtype=torch.long)
    chosen = lp.gather(1, token_ids[:, None]).squeeze(1)
    chosen_rank = (lp > chosen[:, None]).sum(-1) + 1
    k = min(max(ks, default=0), lp.shape[1])
    top_vals, top_ids = lp.topk(k, dim=-1)
    # Whatever beats a top-k value is itself in the top k, so ranks are counted within it.
    top_rank = (top_vals[:, None, :] > top_vals[:, :, None]).sum(-1) + 1
    out = []
    rows = zip(token_ids.tolist(), chosen.tolist(), chosen_rank.tolist(), top_ids.tolist(), top_vals.tolist(), top_rank.tolist(), ks)
    for tok, c, r, ids, vals, ranks, row_k in rows:
        entry = {tok: (c, r)}
        for t, v, rank in zip(ids[:row_k], vals[:row_k], ranks[:row_k]):
            entry.setdefault(t, (v, rank))
        out.append(entry)
    return out


def compute_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, k: int) -> list[TokenLogprobs]:
    """Per row of ``logits`` [N, V]: ``{token: (logprob, rank)}`` for ``token_ids[i]`` plus the top ``k`` tokens.

    Used for sampled tokens and for prompt logprobs (there ``token_ids`` are the next prompt tokens).
    """
    return _logprob_entries(logits, token_ids, [k] * logits.shape[0])


def _needs_penalty(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def _flat_index(lists: Sequence[Sequence[int]], row_ids: Sequence[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, token) index pairs of ragged token lists (``lists[j]`` belongs to row ``row_ids[j]``).

    Built through numpy: ``np.fromiter`` is several times faster than ``torch.tensor`` on long int lists.
    """
    lengths = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
    toks = np.fromiter(chain.from_iterable(lists), dtype=np.int64, count=int(lengths.sum()))
    rows = np.repeat(np.asarray(row_ids, dtype=np.int64), lengths)
    return torch.from_numpy(rows).to(device), torch.from_numpy(toks).to(device)


def _unique_pairs(lists: Sequence[Sequence[int]], row_ids: Sequence[int], vocab: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Distinct (row, token) pairs of the lists and how often each occurs."""
    r, t = _flat_index(lists, row_ids, device)
    keys, counts = torch.unique(r * vocab + t, return_counts=True)
    return keys // vocab, keys % vocab, counts


def apply_penalties(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    """In place on float ``logits``: CTRL repetition penalty over prompt + output tokens, then OpenAI
    frequency/presence penalties over output tokens.

    Only the (row, token) pairs that occur are touched, so the cost follows the number of tokens
    in the histories, not batch x vocab.
    """
    dev, vocab = logits.device, logits.shape[1]
    rep = [i for i, r in enumerate(rows) if r.params.repetition_penalty != 1.0]
    if rep:
        history = [rows[i].prompt_token_ids for i in rep] + [rows[i].output_token_ids for i in rep]
        r, t, _ = _unique_pairs(history, rep + rep, vocab, dev)
        penalty = torch.tensor([row.params.repetition_penalty for row in rows], dtype=logits.dtype, device=dev)[r]
        v = logits[r, t]
        logits[r, t] = torch.where(v > 0, v / penalty, v * penalty)
    used = [i for i, r in enumerate(rows) if r.params.frequency_penalty != 0.0 or r.params.presence_penalty != 0.0]
    if used:
        r, t, counts = _unique_pairs([rows[i].output_token_ids for i in used], used, vocab, dev)
        freq = torch.tensor([row.params.frequency_penalty for row in rows], dtype=logits.dtype, device=dev)[r]
        presence = torch.tensor([row.params.presence_penalty for row in rows], dtype=logits.dtype, device=dev)[r]
        logits[r, t] -= freq * counts.to(logits.dtype) + presence


def apply_logits_processors(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    """In place on float ``logits``: each row's ``params.logits_processors`` in order, on its own row (vLLM's order: before
    penalties)."""
    for i, row in enumerate(rows):
        for fn in row.params.logits_processors:
            args = (row.prompt_token_ids, row.output_token_ids) if processor_arity(fn) == 3 else (row.output_token_ids,)
            out = fn(*args, logits[i])
            if not isinstance(out, torch.Tensor) or out.shape != logits[i].shape:
                raise InvalidArgumentError("logits_processors", f"must return a tensor of shape {list(logits[i].shape)}, got {out!r:.80}")
            logits[i] = out


def filtered_probs(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Row-wise sampling distribution: logits / temperature, then top-k, then top-p (the smallest
    most-likely set whose mass reaches top_p; the top token always stays), then min-p (drop tokens
    below min_p times the top probability). Sorting is skipped when no row uses top-k or top-p."""
    dev = logits.device
    vocab = logits.shape[1]

    def column(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=logits.dtype, device=dev)[:, None]

    x = logits / column([p.temperature for p in params])
    use_k = any(p.top_k > 0 for p in params)
    use_p = any(p.top_p < 1.0 for p in params)
    if use_k or use_p:
        sorted_x, order = x.sort(dim=-1, descending=True)
        rank = torch.arange(vocab, device=dev)[None, :]
        drop = torch.zeros_like(sorted_x, dtype=torch.bool)
        if use_k:
            drop |= rank >= column([p.top_k if p.top_k > 0 else vocab for p in params])
            sorted_x = sorted_x.masked_fill(drop, float("-inf"))
        if use_p:
            probs = sorted_x.softmax(-1)
            mass_before = probs.cumsum(-1) - probs
            top_p = column([p.top_p for p in params])
            drop |= (mass_before >= top_p) & (top_p < 1.0) & (rank > 0)  # top_p == 1 must not lose the tail to rounding
        x = x.masked_fill(torch.empty_like(drop).scatter_(1, order, drop), float("-inf"))
    probs = x.softmax(-1)
    if any(p.min_p > 0 for p in params):
        floor = column([p.min_p for p in params]) * probs.amax(-1, keepdim=True)
        probs = probs.masked_fill(probs < floor, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def _exponential_race(probs: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """One draw per row from ``probs``: seeded rows use their own generator, the rest the global RNG together."""
    noise = torch.empty_like(probs)
    unseeded = [j for j, g in enumerate(generators) if g is None]
    if len(unseeded) == len(generators):
        noise.exponential_()
    else:
        if unseeded:
            noise[unseeded] = torch.empty((len(unseeded), probs.shape[1]), dtype=probs.dtype, device=probs.device).exponential_()
        for j, g in enumerate(generators):
            if g is not None:
                noise[j].exponential_(generator=g)
    # An exact 0 draw would make 0/0 = NaN, which argmax would pick, on a token of probability 0.
    noise.clamp_min_(torch.finfo(noise.dtype).tiny)
    return (probs / noise).argmax(-1)


class Sampler:
    """Turns one step's logits [N, V] (row i belongs to ``rows[i]``) into next tokens and logprobs."""

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SampleResult:
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise InvalidArgumentError("logits", f"must have shape [{len(rows)}, vocab] (one row per SamplingRow), got {list(logits.shape)}")
        plain = all(r.params.is_greedy and not r.banned_token_ids and not _needs_penalty(r.params) and not r.params.logits_processors for r in rows)
        tokens = logits.max(-1).indices if plain else self._sample(logits, rows)  # max's indices: argmax's (the first), several times faster on CPU
        token_list = tokens.tolist()
        logprobs: list[TokenLogprobs | None] = [None] * len(rows)
        wanted = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        if wanted:
            ks = [rows[i].params.logprobs for i in wanted]
            entries = _logprob_entries(logits[wanted], tokens[wanted], ks)
            for i, entry in zip(wanted, entries):
                logprobs[i] = entry
        return SampleResult(token_list, logprobs)

    def _sample(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        x = logits.to(torch.float32, copy=True)
        apply_logits_processors(x, rows)
        apply_penalties(x, rows)
        if any(r.banned_token_ids for r in rows):
            r, t = _flat_index([r.banned_token_ids for r in rows], range(len(rows)), x.device)
            x[r, t] = float("-inf")
        tokens = x.argmax(-1)
        rand = [i for i, r in enumerate(rows) if not r.params.is_greedy]
        if rand:
            probs = filtered_probs(x[rand], [rows[i].params for i in rand])
            tokens[rand] = _exponential_race(probs, [rows[i].generator for i in rand])
        return tokens
