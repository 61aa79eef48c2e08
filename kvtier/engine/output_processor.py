"""After sampling: append tokens, apply stop rules, detokenize, and build ``RequestOutput``s."""

from __future__ import annotations

import time

from kvtier.engine.branching import ranked_beams
from kvtier.engine.sequence import Request, Sequence
from kvtier.outputs import CompletionOutput, Logprob, RequestOutput
from kvtier.tokenizer import IncrementalDetokenizer, Tokenizer, find_stop


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len

    def needs_incremental_text(self, req: Request) -> bool:
        return req.stream or bool(req.params.stop)

    def start(self, req: Request, seq: Sequence) -> None:
        if self.needs_incremental_text(req) and seq.detokenizer is None:
            seq.detokenizer = IncrementalDetokenizer(self.tokenizer, seq.token_ids[: seq.prompt_len], req.params.skip_special_tokens)
            for t in seq.output_token_ids:
                seq.detokenizer.append(t)

    def banned_tokens(self, req: Request, seq: Sequence) -> list[int]:
        """EOS and stop ids are masked until ``min_tokens`` are out."""
        p = req.params
        if len(seq.output_token_ids) >= p.min_tokens:
            return []
        banned = list(p.stop_token_ids or [])
        if not p.ignore_eos:
            banned += sorted(self.tokenizer.eos_token_ids)
        return banned

    def decoded(self, logprobs: dict[int, tuple[float, int]] | None) -> dict[int, Logprob] | None:
        if logprobs is None:
            return None
        return {t: Logprob(lp, rank, self.tokenizer.decode([t], skip_special_tokens=False)) for t, (lp, rank) in logprobs.items()}

    def append(self, req: Request, seq: Sequence, token: int, logprob: float, logprobs: dict[int, Logprob] | None) -> None:
        """Add one sampled token and decide whether the sequence stops."""
        p = req.params
        seq.token_ids.append(token)
        seq.cumulative_logprob += logprob
        if p.logprobs is not None:
            if seq.logprobs is None:
                seq.logprobs = []
            seq.logprobs.append(logprobs or {})
        n_out = len(seq.token_ids) - seq.prompt_len
        delta = seq.detokenizer.append(token) if seq.detokenizer is not None else ""
        if n_out >= p.min_tokens:
            if not p.ignore_eos and token in self.tokenizer.eos_token_ids:
                seq.finish_reason = "stop"
                return
            if p.stop_token_ids and token in p.stop_token_ids:
                seq.finish_reason, seq.stop_reason = "stop", token
                return
            if p.stop and seq.detokenizer is not None:
                text = seq.detokenizer.text
                at = find_stop(text, p.stop, len(delta))
                if at is not None:
                    stop = next(s for s in p.stop if text.startswith(s, at))
                    seq.text = text[: at + len(stop)] if p.include_stop_str_in_output else text[:at]
                    seq.finish_reason, seq.stop_reason = "stop", stop
                    return
        if (p.max_tokens is not None and n_out >= p.max_tokens) or len(seq.token_ids) >= self.max_model_len:
            seq.finish_reason = "length"

    def text_of(self, req: Request, seq: Sequence) -> str:
        if seq.finish_reason == "stop" and isinstance(seq.stop_reason, str):
            return seq.text
        if seq.detokenizer is not None and not seq.finished:
            return seq.detokenizer.text
        return self.tokenizer.decode(seq.output_token_ids, skip_special_tokens=req.params.skip_special_tokens)

    def make_output(self, req: Request) -> RequestOutput:
        seqs = req.seqs if req.beam is None else ranked_beams(req)
        outs = [
            CompletionOutput(
                index=i if req.beam is not None else s.index,
                text=self.text_of(req, s),
                token_ids=list(s.output_token_ids),
                cumulative_logprob=s.cumulative_logprob,
                logprobs=s.logprobs,
                finish_reason=s.finish_reason,
                stop_reason=s.stop_reason,
            )
            for i, s in enumerate(seqs)
        ]
        outs.sort(key=lambda o: o.index)
        finished = req.is_finished
        if finished and req.metrics.finished_time is None:
            req.metrics.finished_time = time.monotonic()
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, req.prompt_logprobs, outs, finished, req.metrics, req.num_cached_tokens)

