"""Engine outputs as OpenAI response bodies and server-sent-event chunks."""

from __future__ import annotations

import json
import time

from kvtier.outputs import CompletionOutput, RequestOutput
from kvtier.tokenizer import Tokenizer


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


def completion_logprobs(tok: Tokenizer, out: CompletionOutput, start: int = 0, offset0: int = 0) -> dict | None:
    """Legacy completions logprobs: tokens, token_logprobs, top_logprobs, text_offset from ``start`` on."""
    if out.logprobs is None:
        return None
    tokens, lps, tops, offsets = [], [], [], []
    offset = offset0
    for tid, entry in zip(out.token_ids[start:], out.logprobs[start:]):
        text = tok.decode([tid], skip_special_tokens=False)
        tokens.append(text)
        lps.append(entry[tid].logprob)
        tops.append({e.decoded_token: e.logprob for t, e in entry.items() if t != tid or e.rank is not None})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(tok: Tokenizer, out: CompletionOutput, top: int, start: int = 0) -> dict | None:
    if out.logprobs is None:
        return None
    content = []
    for tid, entry in zip(out.token_ids[start:], out.logprobs[start:]):
        text = tok.decode([tid], skip_special_tokens=False)
        ranked = sorted(entry.items(), key=lambda kv: kv[1].rank or 0)[:top]
        content.append({
            "token": text, "logprob": entry[tid].logprob, "bytes": list(text.encode()),
            "top_logprobs": [{"token": e.decoded_token, "logprob": e.logprob, "bytes": list((e.decoded_token or "").encode())} for _, e in ranked],
        })
    return {"content": content}


def stream_safe_text(text: str, finished: bool, stops: list[str]) -> str:
    """Text that can be streamed now: hold back a tail that could still grow into a stop string."""
    if finished or not stops:
        return text
    hold = max(len(s) for s in stops) - 1
    return text[: max(0, len(text) - hold)]


def stream_deltas(out: RequestOutput, sent: dict[tuple[int, int], tuple[int, int, bool]], prompt_index: int, stops: list[str]):
    """Per choice that moved: (choice, new text, index of its first unsent token); ``sent`` keeps the progress."""
    for c in out.outputs:
        key = (prompt_index, c.index)
        sent_text, sent_tokens, sent_finish = sent.get(key, (0, 0, False))
        text = stream_safe_text(c.text, c.finish_reason is not None, stops)
        delta = text[sent_text:]
        if delta or len(c.token_ids) > sent_tokens or (c.finish_reason is not None and not sent_finish):
            sent[key] = (len(text), len(c.token_ids), c.finish_reason is not None)
            yield c, delta, sent_tokens


def base(kind: str, rid: str, model: str, created: int | None = None) -> dict:
    return {"id": rid, "object": kind, "created": created or int(time.time()), "model": model}


def completion_body(rid: str, model: str, tok: Tokenizer, outputs: list[RequestOutput], n: int, echo: bool) -> dict:
    choices, prompt_tokens, completion_tokens = [], 0, 0
    for i, out in enumerate(outputs):
        prompt_tokens += len(out.prompt_token_ids)
        prefix = (out.prompt if out.prompt is not None else tok.decode(out.prompt_token_ids)) if echo else ""
        for c in out.outputs:
            completion_tokens += len(c.token_ids)
            choices.append({"index": i * n + c.index, "text": prefix + c.text, "logprobs": completion_logprobs(tok, c, offset0=len(prefix)),
                            "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
    return {**base("text_completion", rid, model), "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}


def chat_body(rid: str, model: str, tok: Tokenizer, out: RequestOutput, top_logprobs: int) -> dict:
    choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text}, "logprobs": chat_logprobs(tok, c, top_logprobs),
                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason} for c in out.outputs]
    return {**base("chat.completion", rid, model), "choices": choices,
            "usage": usage(len(out.prompt_token_ids), sum(len(c.token_ids) for c in out.outputs))}
