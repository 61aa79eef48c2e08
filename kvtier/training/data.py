"""Training batches: packed rows of stdlib code, each possibly opened by a long-context retrieval document.

A row of ``seq_len`` tokens is drawn from a :class:`RetrievalMix` (a recipe's, or one stage's own): with
probability ``copy_fraction`` it is a copy row (random tokens repeated across code gaps); with probability
``retrieval_fraction`` it is packed with generated documents (passkey, multi-key needle or variable
tracking, answers included) whose lengths are drawn log-uniformly from ``min_tokens`` up to the rest of
the row, so every octave of context length gets the same share of answers; otherwise (and for the tail
the documents do not fill) it is a window of the tokenized stdlib stream. Many short documents give the
copying circuit many answers to learn from; the long ones teach it to reach far.

Each document hides its needles in a haystack kind drawn from the mix's weights (from the corpus's train
split) and, with ``vary_phrasing``, says them in one of the task's phrasings; the held-out haystack and
phrasings never appear, so evaluations on them measure generalisation.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace

import numpy as np
import torch
from tokenizers import Tokenizer as HFTokenizer

from kvtier.errors import InvalidArgumentError
from kvtier.eval.haystacks import HAYSTACKS
from kvtier.eval.retrieval import PHRASINGS, RetrievalSample, multikey_needle, passkey, phrasing_names, variable_tracking
from kvtier.training.bpe import BOS_ID, EOS_ID


class TokenIds:
    """``encode(text) -> ids`` over a ``tokenizers.Tokenizer``, the shape the retrieval generators take."""

    def __init__(self, tok: HFTokenizer) -> None:
        self.tok = tok

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids


def token_stream(tok: HFTokenizer, texts: list[str]) -> np.ndarray:
    """All texts encoded and concatenated as ``<s> text </s>`` documents."""
    ids: list[int] = []
    for enc in tok.encode_batch(texts):
        ids.extend(enc.ids)  # the post-processor already put <s> first
        ids.append(EOS_ID)
    return np.asarray(ids, dtype=np.int32)


MULTIKEY_DISTRACTORS = (1, 6)  # inclusive range drawn per document (fewer where a short document cannot hold them)
COPY_SEGMENT = (16, 128)  # random tokens per copy-row segment
MIN_DOCUMENT_TOKENS = 128


@dataclass(frozen=True)
class RetrievalMix:
    """How often each retrieval task opens a row, and the shortest document generated."""

    retrieval_fraction: float = 0.40
    copy_fraction: float = 0.15  # rows of random-token segments repeated across code gaps (see BatchMaker.copy_row)
    passkey: float = 0.35
    multikey: float = 0.45
    vartrack: float = 0.20
    min_tokens: int = 128  # the shortest passkey document is ~100 tokens; short documents give many answers per row
    followups: bool = False  # multi-key documents go on to ask about their other needles, as many as the row holds
    haystacks: tuple[tuple[str, float], ...] = (("noise", 1.0),)  # (kind, weight): what documents hide needles in
    vary_phrasing: bool = False  # draw each needle's wording among the task's training phrasings (else the default)
    vartrack_hops: tuple[int, int] = (1, 4)  # inclusive range of chain links: a curriculum widens it stage by stage

    def __post_init__(self) -> None:
        for name in ("retrieval_fraction", "copy_fraction", "passkey", "multikey", "vartrack"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise InvalidArgumentError(name, f"must be in [0, 1], got {getattr(self, name)!r}")
        if self.retrieval_fraction + self.copy_fraction > 1.0:
            raise InvalidArgumentError("retrieval_fraction", f"plus copy_fraction must be at most 1, got {self.retrieval_fraction} + {self.copy_fraction}")
        if self.passkey + self.multikey + self.vartrack <= 0.0:
            raise InvalidArgumentError("passkey", "passkey, multikey and vartrack weights must not all be 0")
        if not isinstance(self.followups, bool):
            raise InvalidArgumentError("followups", f"must be True or False, got {self.followups!r}")
        if self.min_tokens < MIN_DOCUMENT_TOKENS:
            raise InvalidArgumentError("min_tokens", f"must be at least {MIN_DOCUMENT_TOKENS} (a passkey document's own text), got {self.min_tokens}")
        trainable = [k for k in HAYSTACKS if k != "heldout"]
        for kind, weight in self.haystacks:
            if kind not in trainable:
                raise InvalidArgumentError("haystacks", f"kinds must be among {', '.join(trainable)} (heldout is for evaluation only), got {kind!r}")
            if not weight >= 0.0:
                raise InvalidArgumentError("haystacks", f"weights must be >= 0, got {weight!r} for {kind}")
        if not sum(w for _, w in self.haystacks) > 0.0:
            raise InvalidArgumentError("haystacks", f"must name at least one kind with a positive weight, got {self.haystacks!r}")
        low, high = self.vartrack_hops
        if not 1 <= low <= high <= 16:
            raise InvalidArgumentError("vartrack_hops", f"must be (low, high) with 1 <= low <= high <= 16, got {self.vartrack_hops!r}")

    def with_hops(self, low: int, high: int) -> RetrievalMix:
        """This mix with variable-tracking chains of ``low`` to ``high`` links: one stage of a curriculum."""
        return replace(self, vartrack_hops=(low, high))

    def phrasings(self, task: str) -> tuple[str | None, ...]:
        """The wordings a ``task`` document may use: the training phrasings, or only the task's default."""
        if not self.vary_phrasing or task not in PHRASINGS:
            return (None,)
        return phrasing_names(task, held_out=False)


class BatchMaker:
    def __init__(self, tok: HFTokenizer, stream: np.ndarray, seed: int) -> None:
        if len(stream) < 2:
            raise ValueError("the training stream is empty")
        self.ids = TokenIds(tok)
        self.vocab_size = tok.get_vocab_size()
        self.stream = stream
        self.rng = random.Random(seed)

    def retrieval_document(self, max_tokens: int, mix: RetrievalMix) -> list[int]:
        rng = self.rng
        length = round(math.exp(rng.uniform(math.log(mix.min_tokens), math.log(max_tokens))))
        task = rng.choices(("passkey", "multikey", "vartrack"), (mix.passkey, mix.multikey, mix.vartrack))[0]
        seed, depth = rng.randrange(1 << 62), rng.random()
        budget = length - 16  # room for the completion and </s>
        count = rng.randint(*MULTIKEY_DISTRACTORS if task == "multikey" else mix.vartrack_hops)
        kinds, weights = zip(*mix.haystacks)
        haystack = rng.choices(kinds, weights)[0]
        phrasing = rng.choice(mix.phrasings(task))
        sample = self._fitting_sample(task, budget, depth, seed, count, haystack, phrasing)
        asked = len(sample.followups) if mix.followups else 0
        ids = self.ids.encode(sample.prompt + sample.completion + "".join(sample.followups[:asked]))
        while asked and len(ids) > max_tokens - 1:  # drop follow-ups the row has no room for
            asked -= 1
            ids = self.ids.encode(sample.prompt + sample.completion + "".join(sample.followups[:asked]))
        return ids[:max_tokens - 1] + [EOS_ID]

    def _fitting_sample(self, task: str, budget: int, depth: float, seed: int, count: int, haystack: str, phrasing: str | None) -> RetrievalSample:
        """The task's sample with ``count`` distractors (or hops) cut down until it fits ``budget``; a passkey if none does."""
        where = {"haystack": haystack, "split": "train"}
        worded = {**where, **({"phrasing": phrasing} if phrasing else {})}
        generate = {"multikey": lambda n: multikey_needle(self.ids, budget, depth, seed, num_distractors=n, **worded),
                    "vartrack": lambda n: variable_tracking(self.ids, budget, depth, seed, num_hops=n, **where)}.get(task)
        for n in range(count, 0, -1) if generate else ():
            try:
                return generate(n)
            except InvalidArgumentError:  # the generator's own length check: too many needles for this budget
                continue
        return passkey(self.ids, budget, depth, seed, **(worded if task == "passkey" else where))

    def copy_row(self, seq_len: int) -> list[int]:
        """A random-token segment repeated after code gaps of log-uniform length.

        Every repeat is predictable only by finding the earlier copy and reading on from it (an
        induction head, Olsson et al. 2022), the circuit retrieval needs; this makes it form early.
        """
        rng = self.rng
        segment = [rng.randrange(3, self.vocab_size) for _ in range(rng.randint(*COPY_SEGMENT))]
        row = [BOS_ID] + segment
        while len(row) < seq_len:
            gap = round(math.exp(rng.uniform(0.0, math.log(max(2, seq_len // 2))))) - 1
            row += self.window(gap) + segment
        return row[:seq_len]

    def window(self, n: int) -> list[int]:
        start = self.rng.randrange(0, len(self.stream) - n) if len(self.stream) > n else 0
        window = self.stream[start:start + n].tolist()
        return window + [BOS_ID] * (n - len(window))

    def row(self, seq_len: int, mix: RetrievalMix) -> list[int]:
        doc: list[int] = []
        draw = self.rng.random()
        if draw < mix.copy_fraction:
            return self.copy_row(seq_len)
        if draw < mix.copy_fraction + mix.retrieval_fraction:
            while seq_len - len(doc) >= mix.min_tokens:
                doc += self.retrieval_document(seq_len - len(doc), mix)
        return doc + self.window(seq_len - len(doc))

    def batch(self, batch_size: int, seq_len: int, mix: RetrievalMix) -> torch.Tensor:
        return torch.tensor([self.row(seq_len, mix) for _ in range(batch_size)], dtype=torch.long)
