"""Where a request's sequences split: ``n`` parallel samples and beam search, over blocks shared copy-on-write.

Parallel sampling forks the prompt's sequence into ``n`` after its first logits; the children share
the prompt's blocks and then sample on their own. In beam search each step every live beam proposes its best continuations; the ``beam_width`` best by
cumulative log-probability survive, a parent chosen twice is forked (sharing its blocks),
and a parent chosen by none is freed. As in HF transformers, an EOS continuation becomes a
finished hypothesis only when it ranks among the ``beam_width`` best candidates of its step,
hypotheses are ranked with HF's length penalty, cum_logprob / length ** length_penalty, and
``early_stopping`` decides when to stop: True as soon as ``beam_width`` hypotheses finished;
False once the best live beam, at its current length, cannot beat the worst of them; "never"
the same, judging the live beam at ``max_tokens`` when the length penalty is positive.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kvtier.cache.coordinator import KVCacheCoordinator
from kvtier.engine.sequence import Request, Sequence
from kvtier.tokenizer import Tokenizer


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


class Branching:
    """Forks and frees a request's sequences in the KV cache as parallel sampling and beam search need."""

    def __init__(self, kv: KVCacheCoordinator, tokenizer: Tokenizer, start_output: Callable[[Request, Sequence], None],
                 generator: Callable[[int, int], torch.Generator], max_model_len: int) -> None:
        self.kv = kv
        self.tokenizer = tokenizer  # its EOS ids end a beam
        self.start_output = start_output  # readies a new sequence's detokenizer
        self.generator = generator  # (seed, sample index) -> the sample's own random stream
        self.max_model_len = max_model_len

    def fork_samples(self, req: Request) -> None:
        """n > 1: after the prompt's first logits, split into n sequences sharing the prompt's blocks."""
        if req.forked or req.params.n == 1:
            return
        parent = req.seqs[0]
        for i in range(1, req.params.n):
            child = parent.fork(i)
            if req.params.seed is not None:
                child.generator = self.generator(req.params.seed, i)
            self.kv.fork(parent.seq_id, child.seq_id)
            self.start_output(req, child)
            req.seqs.append(child)
        req.forked = True

    def beam_step(self, req: Request, logits: torch.Tensor) -> None:
        """One beam-search step over the live beams' logits [beams, V]: fork the parents chosen twice, free those chosen
        by none, append each survivor's token, and end every beam when the search is done."""
        parents = req.live_seqs
        kept: set[int] = set()
        beams: list[tuple[Sequence, int, float]] = []
        for parent, token, lp in select(req, logits, self.tokenizer.eos_token_ids):  # fork before any parent takes its token
            if parent.seq_id in kept:
                child = parent.fork(0)
                self.kv.fork(parent.seq_id, child.seq_id)
                beams.append((child, token, lp))
            else:
                kept.add(parent.seq_id)
                beams.append((parent, token, lp))
        for p in parents:
            if p.seq_id not in kept:
                self.kv.free(p.seq_id)
        for seq, token, lp in beams:
            seq.token_ids.append(token)
            seq.cumulative_logprob += lp
        req.seqs = [b[0] for b in beams]
        if is_done(req, self.max_model_len):
            for seq in req.seqs:
                seq.finish_reason = "length"
