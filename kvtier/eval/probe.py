"""Run retrieval probes on a transformers model or through kvtier's engine; both prefill the haystack and feed the
question through decode steps (the engine by :class:`~kvtier.sampling.logits_processors.ForcedTokens`).

Feeding the question one token at a time is how a KV-cache method that acts after prefill (eviction,
selection) must be measured: the question's tokens see only what the method kept. With the full cache
it gives the same answer as one prefill; it is the protocol the method comparisons reuse.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kvtier.errors import InvalidArgumentError
from kvtier.eval.common_words import COMMONWORDS, common_words
from kvtier.eval.retrieval import RetrievalSample, TokenEncoder, make_sample
from kvtier.sampling.logits_processors import ForcedTokens
from kvtier.sampling_params import SamplingParams

if TYPE_CHECKING:
    from kvtier.entrypoints.llm import LLM


@dataclass(frozen=True)
class ProbeResult:
    task: str
    context_tokens: int
    trials: int
    accuracy: float  # the mean score: a common-words reply scores the fraction of the words it names
    by_depth: dict[float, float]  # depth -> accuracy over the trials at that depth (none for common words)
    scores: tuple[float, ...] = ()  # each sample's score, in sample order


def trial_depths(trials: int, num_depths: int = 10) -> list[float]:
    """Depths spread evenly over [0, 1], cycled so every depth gets trials // num_depths of them."""
    return [round((i % num_depths) / (num_depths - 1), 3) for i in range(trials)]


def samples(task: str, tokenizer: TokenEncoder, context_tokens: int, trials: int, seed: int, **sample_kw: str) -> list[RetrievalSample]:
    """The probe's ``trials`` samples: seeds ``seed + i``, depths from :func:`trial_depths` (common words has none)."""
    if task == COMMONWORDS:
        return [common_words(tokenizer, context_tokens, seed + i, **sample_kw) for i in range(trials)]
    return [make_sample(task, tokenizer, context_tokens, depth, seed + i, **sample_kw) for i, depth in enumerate(trial_depths(trials))]


@torch.inference_mode()
def greedy_after_decoded_question(model: torch.nn.Module, context_ids: list[int], question_ids: list[int], max_new_tokens: int) -> list[int]:
    """Prefill ``context_ids``, feed ``question_ids`` one decode step each, then decode greedily.

    Each step passes its position: some transformers models (Bamba) otherwise number a decode step's
    token from 0, as if the cache were empty.
    """
    out = model(input_ids=torch.tensor([context_ids]), use_cache=True)
    past, pos = out.past_key_values, len(context_ids)

    def step(token: int):
        nonlocal pos
        result = model(input_ids=torch.tensor([[token]]), position_ids=torch.tensor([[pos]]), past_key_values=past, use_cache=True)
        pos += 1
        return result

    for t in question_ids:
        out = step(t)
    generated: list[int] = []
    for _ in range(max_new_tokens):
        nxt = int(out.logits[0, -1].argmax())
        generated.append(nxt)
        out = step(nxt)
    return generated


def probe_replies(model: torch.nn.Module, tokenizer: TokenEncoder, decode, task: str, context_tokens: int, trials: int, seed: int = 0,
                  max_new_tokens: int = 12, **sample_kw: str) -> Iterator[tuple[RetrievalSample, str]]:
    """Each of ``trials`` samples (seeds ``seed + i``, depths from :func:`trial_depths`) with the model's reply.

    ``tokenizer.encode`` must add ``<s>``; ``decode(ids) -> str`` turns the generated ids back into text;
    ``sample_kw`` (haystack, split, phrasing) goes to :func:`kvtier.eval.retrieval.make_sample`.
    """
    for sample in samples(task, tokenizer, context_tokens, trials, seed, **sample_kw):
        context_ids, question_ids = split_prompt(tokenizer, sample)
        yield sample, decode(greedy_after_decoded_question(model, context_ids, question_ids, max_new_tokens))


def run_probe(model: torch.nn.Module, tokenizer: TokenEncoder, decode, task: str, context_tokens: int, trials: int, seed: int = 0,
              max_new_tokens: int = 12, **sample_kw: str) -> ProbeResult:
    """Accuracy of ``task`` at ``context_tokens`` over the replies of :func:`probe_replies`, overall and by depth."""
    return score(task, context_tokens, probe_replies(model, tokenizer, decode, task, context_tokens, trials, seed, max_new_tokens, **sample_kw))


def split_prompt(tokenizer: TokenEncoder, sample: RetrievalSample) -> tuple[list[int], list[int]]:
    """The sample's prompt as (haystack ids, question ids): the prompt's own tokenization, cut where the haystack's ends."""
    context_ids = list(tokenizer.encode(sample.context))
    return context_ids, list(tokenizer.encode(sample.prompt))[len(context_ids):]


PROTOCOLS = ("query-agnostic", "query-aware")  # kvpress's names: the question after compression, or inside the compressed prompt


def engine_replies(llm: LLM, tokenizer: TokenEncoder, task: str, context_tokens: int, trials: int, seed: int = 0,
                   max_new_tokens: int = 12, protocol: str = "query-agnostic", **sample_kw: str) -> list[tuple[RetrievalSample, str]]:
    """The samples of :func:`probe_replies` answered by kvtier's engine, all trials in one batch, the answer decoded
    greedily up to EOS. ``query-agnostic``: each haystack prefilled (in the engine's chunks), its question forced
    through decode steps, so a KV method compresses before it sees the question. ``query-aware``: haystack and
    question prefilled together, so the method sees the question."""
    if protocol not in PROTOCOLS:
        raise InvalidArgumentError("protocol", f"must be one of {', '.join(PROTOCOLS)}; got {protocol!r}")
    batch = samples(task, tokenizer, context_tokens, trials, seed, **sample_kw)
    prompts, params, forced = [], [], []
    for s in batch:
        context_ids, question_ids = split_prompt(tokenizer, s)
        if protocol == "query-aware":
            context_ids, question_ids = context_ids + question_ids, []
        prompts.append({"prompt_token_ids": context_ids})
        params.append(SamplingParams(temperature=0.0, max_tokens=len(question_ids) + max_new_tokens, logits_processors=[ForcedTokens(question_ids)]))
        forced.append(len(question_ids))
    outs = llm.generate(prompts, params, use_tqdm=False)
    decode = llm.get_tokenizer().decode
    return [(s, decode(list(o.outputs[0].token_ids)[n:])) for s, o, n in zip(batch, outs, forced)]


def run_engine_probe(llm: LLM, tokenizer: TokenEncoder, task: str, context_tokens: int, trials: int, seed: int = 0,
                     max_new_tokens: int = 12, protocol: str = "query-agnostic", **sample_kw: str) -> ProbeResult:
    """Accuracy of ``task`` at ``context_tokens`` over the replies of :func:`engine_replies`, overall and by depth."""
    return score(task, context_tokens, engine_replies(llm, tokenizer, task, context_tokens, trials, seed, max_new_tokens, protocol, **sample_kw))


def score(task: str, context_tokens: int, replies: Iterable[tuple[RetrievalSample, str]]) -> ProbeResult:
    """The mean score over (sample, reply) pairs, overall and by depth (samples without a depth count only overall)."""
    hits: dict[float | None, list[float]] = defaultdict(list)
    total = []
    for sample, reply in replies:
        total.append(sample.score(reply))
        hits[sample.depth].append(total[-1])
    by_depth = {d: sum(v) / len(v) for d, v in sorted((d, v) for d, v in hits.items() if d is not None)}
    return ProbeResult(task, context_tokens, len(total), sum(total) / len(total), by_depth, tuple(total))


@torch.inference_mode()
def induction_accuracy(model: torch.nn.Module, vocab_size: int, segment: int = 64, rows: int = 16, seed: int = 0) -> float:
    """Greedy next-token accuracy on the second copy of random-token segments (``<s> S S``).

    Only an induction head (find the earlier copy, read the token after it) predicts the second copy;
    this is the circuit every retrieval task needs, so it shows whether and when it has formed.
    """
    g = torch.Generator().manual_seed(seed)
    seg = torch.randint(3, vocab_size, (rows, segment), generator=g)
    x = torch.cat([torch.zeros(rows, 1, dtype=torch.long), seg, seg], 1)
    logits = model(input_ids=x).logits
    return (logits[:, segment + 1:-1].argmax(-1) == x[:, segment + 2:]).float().mean().item()
