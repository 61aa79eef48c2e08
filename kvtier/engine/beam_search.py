"""Beam search over the paged cache: beams are sequences that share blocks through copy-on-write.

Each step every live beam proposes its best continuations; the ``beam_width`` best by
cumulative log-probability survive, a parent chosen twice is forked (sharing its blocks),
and a parent chosen by none is freed. Finished hypotheses are ranked with HF's length
penalty, cum_logprob / length ** length_penalty.
"""

from __future__ import annotations

import torch

from kvtier.engine.sequence import Request, Sequence


def beam_score(seq: Sequence, length_penalty: float) -> float:
    return seq.cumulative_logprob / max(1, len(seq.output_token_ids)) ** length_penalty


def ranked_beams(req: Request) -> list[Sequence]:
    beam = req.beam
    pool = req.finished_beams + req.seqs
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
    for val, idx in zip(top_vals.tolist(), top_idx.tolist()):
        parent, token = seqs[idx // vocab], idx % vocab
        lp = logprobs[idx // vocab, token].item()
        if token in eos_ids and not req.beam.ignore_eos:
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
    """Stop at max_tokens, or once ``beam_width`` hypotheses finished and no live beam can beat the worst of them."""
    beam = req.beam
    live = req.live_seqs
    if not live or len(live[0].output_token_ids) >= beam.max_tokens or len(live[0].token_ids) >= max_model_len:
        return True
    if len(req.finished_beams) < beam.beam_width:
        return False
    finished = sorted((beam_score(s, beam.length_penalty) for s in req.finished_beams), reverse=True)
    best_live = max(beam_score(s, beam.length_penalty) for s in live)
    return best_live <= finished[beam.beam_width - 1]
