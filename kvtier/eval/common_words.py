"""Common-words extraction (CWE), after RULER (Hsieh et al., 2024): name the most frequent words of a long numbered list.

An aggregation task, not a needle: the evidence is spread over the whole context, so a KV method that keeps only some
of it loses count. ``num_common`` words appear ``freq_common`` times each, the others ``freq_uncommon`` times, shuffled
and numbered ("1. word 2. word ..."); rare words are added until the prompt fills the token budget. The frequencies
are RULER's: 30 and 3, and 6 and 1 below 4,096 tokens, where thirty copies of ten words would not fit. So are the
header and the question; RULER's one-shot example before the list is left out (at 512 tokens it would take a third
of the context). The words are those of the held-out text (:func:`kvtier.eval.haystacks.source_texts`), which neither
shipped model nor its tokenizer trained on, less the words of the header and question. A reply is scored as RULER's
``string_match_all``: the fraction of the common words it names, on whole words (``line`` is not found in ``lines``).
All randomness comes from ``random.Random(seed)``.
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass

from kvtier.errors import InvalidArgumentError
from kvtier.eval.haystacks import source_texts
from kvtier.eval.retrieval import RetrievalSample, TokenEncoder, fill

COMMONWORDS = "commonwords"
ANSWER_TOKENS = 64  # the reply's room: ten numbered words (RULER allows 120 tokens)
HEADER = "Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones that appear most often.\n"
QUESTION = "\nQuestion: What are the {n} most common words in the above list? Answer: The top {n} words appearing most often in the list are:"


@dataclass(frozen=True)
class CommonWordsSample(RetrievalSample):
    """A CWE prompt; ``answer`` holds the common words, ``depth`` is None (nothing is hidden at a depth)."""

    def score(self, generated: str) -> float:
        """RULER's ``string_match_all`` on whole words: the fraction of the common words the reply names, in any case."""
        said = set(re.findall(r"[a-z]+", generated.lower()))
        return sum(word in said for word in self.answer) / len(self.answer)

    def is_correct(self, generated: str) -> bool:
        return self.score(generated) == 1.0


def ruler_frequencies(context_tokens: int) -> tuple[int, int]:
    """RULER's (common, uncommon) repetitions for a context of that length."""
    return (6, 1) if context_tokens < 4096 else (30, 3)


@functools.cache
def word_pool() -> tuple[str, ...]:
    """The held-out text's distinct lower-case words of 4 to 10 letters, sorted; none from the header or question."""
    prompt_words = set(re.findall(r"[a-z]+", (HEADER + QUESTION).lower()))
    words = set(re.findall(r"\b[a-z]{4,10}\b", " ".join(source_texts("heldout"))))
    return tuple(sorted(words - prompt_words))


def common_words(tokenizer: TokenEncoder, context_tokens: int, seed: int, num_common: int = 10, freq_common: int | None = None,
                 freq_uncommon: int | None = None) -> CommonWordsSample:
    """A CWE sample of ``context_tokens`` tokens (``tokenizer.encode`` counts them, as for the retrieval tasks); the
    frequencies default to :func:`ruler_frequencies`."""
    ruler_common, ruler_uncommon = ruler_frequencies(context_tokens)
    freq_common = ruler_common if freq_common is None else freq_common
    freq_uncommon = ruler_uncommon if freq_uncommon is None else freq_uncommon
    if not 1 <= num_common <= 50:
        raise InvalidArgumentError("num_common", f"must be in [1, 50], got {num_common!r}")
    if not freq_common > freq_uncommon >= 1:
        raise InvalidArgumentError("freq_common", f"must exceed freq_uncommon >= 1, got {freq_common!r} and {freq_uncommon!r}")
    pool = word_pool()
    words = random.Random(seed).sample(pool, len(pool))
    common, rare = words[:num_common], words[num_common:]
    question = QUESTION.format(n=num_common)

    def build(n: int) -> str:
        if n > len(rare):
            raise InvalidArgumentError("context_tokens", f"too long for common words: the word list has only {len(pool)} words, got {context_tokens}")
        listed = common * freq_common + rare[:n] * freq_uncommon
        random.Random(seed).shuffle(listed)
        return HEADER + numbered(listed) + question

    prompt, length = fill(tokenizer, context_tokens, build)
    return CommonWordsSample(COMMONWORDS, prompt, question, " " + numbered(common), tuple(common), length, None)


def numbered(words: list[str]) -> str:
    """RULER's list format: ``1. first 2. second ...``."""
    return " ".join(f"{i}. {w}" for i, w in enumerate(words, 1))
