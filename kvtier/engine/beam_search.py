"""Beam search over the paged cache: beams are sequences that share blocks through copy-on-write.

Each step every live beam proposes its best continuations; the ``beam_width`` best by
cumulative log-probability survive, a parent chosen twice is forked (sharing its blocks),
and a parent chosen by none is freed. As in HF transformers, an EOS continuation becomes a
finished hypothesis only when it ranks among the ``beam_width`` best candidates of its step,
hypotheses are ranked with HF's length penalty, cum_logprob / length ** length_penalty, and
``early_stopping`` decides when to stop: True as soon as ``beam_width`` hypotheses finished;
False once the best live beam, at its current length, cannot beat the worst of them; "never"
the same, judging the live beam at ``max_tokens`` when the length penalty is positive.
"""

from __future__ import annotations

import torch

from kvtier.engine.sequence import Request, Sequence


def beam_score(seq: Sequence, length_penalty: float) -> float:
    return seq.cumulative_logprob / max(1, len(seq.output_token_ids)) ** length_penalty


def ranked_beams(req: Request) -> list[Sequence]:
    """The best ``beam_width`` hypotheses. Live beams compete when they ran out of tokens or too few finished; once
    ``beam_width`` finished, a beam still running is not a hypothesis (HF returns finished ones only)."""
    beam = req.beam
    out_of_tokens = bool(req.seqs) and len(req.seqs[0].output_token_ids) >= beam.max_tokens
    pool = req.finished_beams + req.seqs if out_of_tokens or len(req.finished_beams) < beam.beam_width else req.finished_beams
    return sorted(pool, key=lambda s: beam_score(s, beam.length_penalty), reverse=True)[: beam.beam_width]


def select(req: Request, logits: torch.Tensor, eos_ids: set[int]) -> list[tuple[Sequence, int, float]]:
    """The surviving (parent, token, token_logprob) triples; EOS continuations go to ``finished_beams``."""
    width = req.beam.beam_width
    seqs = req.live_seqs
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    totals = logprobs + torch.tensor([s.cumulative_logprob for s in seqs], device=logprobs.device)[:, None]
    vocab = logprobs.shape[-1]
    k = min(2 * width, totals.numel())
    top_vals, top_idx = totals.flatten().topk(k)
    chosen: list[tuple[Sequence, int, float]] = []
    for rank, (val, idx) in enumerate(zip(top_vals.tolist(), top_idx.tolist())):
        parent, token = seqs[idx // vocab], idx % vocab
        lp = logprobs[idx // vocab, token].item()
        if token in eos_ids and not req.beam.ignore_eos:
            if rank >= width:
                continue  # only the step's best beam_width candidates may finish
            done = parent.fork(parent.index)
            done.cumulative_logprob = val
            done.token_ids.append(token)
            done.finish_reason = "stop"
            req.finished_beams.append(done)
            continue
        chosen.append((parent, token, lp))
        if len(chosen) == width:
            break
    return chosen


def is_done(req: Request, max_model_len: int) -> bool:
    """Stop at max_tokens, or once ``beam_width`` hypotheses finished and ``early_stopping`` says the live beams are done."""
    beam = req.beam
    live = req.live_seqs
    if not live or len(live[0].output_token_ids) >= beam.max_tokens or len(live[0].token_ids) >= max_model_len:
        return True
    if len(req.finished_beams) < beam.beam_width:
        return False
    if beam.early_stopping is True:
        return True
    worst = sorted((beam_score(s, beam.length_penalty) for s in req.finished_beams), reverse=True)[beam.beam_width - 1]
    length = beam.max_tokens if beam.early_stopping == "never" and beam.length_penalty > 0 else len(live[0].output_token_ids)
    best_possible = max(s.cumulative_logprob for s in live) / length ** beam.length_penalty
    return best_possible <= worst
