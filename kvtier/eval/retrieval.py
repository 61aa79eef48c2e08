"""Seeded long-context retrieval documents: passkey, multi-key needle, variable tracking.

These are the probes that tell whether a KV-cache method kept what the model needs. The passkey task
follows Mohtashami & Jaggi (Landmark Attention, 2023): a number hidden at a chosen depth in repeated
filler, asked for at the end. Multi-key needle and variable tracking follow RULER (Hsieh et al., 2024):
"The special magic number for KEY is VALUE." among distractor needles, and chains
``VAR A = 12345``, ``VAR B = VAR A`` whose members must all be named.

Each generator takes the model's tokenizer (anything with ``encode(text) -> list[int]``) and fills the
context up to a token budget, so "2K context" means 2,048 tokens of that model. The haystack is one of
``kvtier.eval.haystacks.HAYSTACKS`` (default ``noise``, the filler above; code, prose, mixtures, and a
held-out kind for evaluation only), drawn from the split a ``split`` argument names. The same arguments
give the same sample on every machine: all randomness comes from ``random.Random(seed)``.
A sample's ``prompt`` ends where the answer begins; ``completion`` is what a perfect model writes next.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from kvtier.errors import InvalidArgumentError
from kvtier.eval.haystacks import FILLER, Haystack  # noqa: F401  (FILLER: the noise haystack, named here as before)

ADJECTIVES = (
    "amber", "bitter", "bold", "brave", "calm", "clever", "cold", "crisp", "dark", "eager", "early", "faint", "fancy", "fierce",
    "gentle", "glad", "golden", "grand", "happy", "hidden", "hollow", "humble", "icy", "jolly", "keen", "late", "lazy", "little",
    "loud", "lucky", "mellow", "misty", "noble", "odd", "pale", "plain", "proud", "quick", "quiet", "rapid", "rare", "rough",
    "royal", "rusty", "silent", "silver", "sleepy", "smooth", "solid", "sour", "swift", "tall", "tender", "tiny", "vast", "warm",
    "wild", "wise", "young", "zesty",
)
NOUNS = (
    "anchor", "apple", "arrow", "badger", "basket", "beacon", "bridge", "candle", "canyon", "castle", "cedar", "cloud", "comet",
    "copper", "crane", "desert", "dragon", "eagle", "ember", "falcon", "feather", "forest", "garden", "glacier", "harbor",
    "helmet", "island", "jacket", "kettle", "lantern", "lemon", "meadow", "mirror", "monkey", "needle", "ocean", "orchard",
    "otter", "pebble", "pepper", "pillow", "planet", "puzzle", "rabbit", "river", "rocket", "saddle", "shadow", "spider",
    "statue", "tiger", "tunnel", "valley", "violin", "wagon", "walnut", "whale", "window", "wizard", "zebra",
)
TASKS = ("passkey", "multikey", "vartrack")


@dataclass(frozen=True)
class Phrasing:
    """How a needle is said and asked for. ``{key}`` is the value to retrieve; ``{name}`` names it (multi-key needle);
    ``{phrase}`` is a key phrase drawn per sample (two random words), so that a model trained on it must match the
    question's key phrase against the needle's instead of learning one. Each question restates the needle's key phrase
    and ends where the value begins, as RULER's do."""

    key_phrase: str  # what the needle calls its value; the question says it again
    header: str
    needle: str
    question: str
    held_out: bool = False  # never in a training document: for evaluation only


_LANDMARK_HEAD = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                  "I will quiz you about the important information there.\n")
_RULER_HEAD = "Some special magic numbers are hidden within the following text. Make sure to memorize it. I will quiz you about the numbers afterwards.\n"
_PLAIN_HEAD = "A number is mentioned somewhere in the text below. Remember it.\n"
PASSKEY_PHRASINGS = {
    "landmark": Phrasing("pass key", _LANDMARK_HEAD, "The pass key is {key}. Remember it. {key} is the pass key.", "\nWhat is the pass key? The pass key is"),
    "ruler": Phrasing("special magic number", _RULER_HEAD, "One of the special magic numbers is: {key}.",
                      "\nWhat is the special magic number mentioned in the provided text? The special magic number mentioned in the provided text is"),
    "named": Phrasing("{phrase}", _PLAIN_HEAD, "The {phrase} is {key}.", "\nWhat is the {phrase}? The {phrase} is"),
    "access-code": Phrasing("access code", _PLAIN_HEAD, "The access code is {key}.", "\nWhat is the access code? The access code is", held_out=True),
    "secret-number": Phrasing("secret number", _PLAIN_HEAD, "The secret number is {key}.", "\nWhat is the secret number? The secret number is", held_out=True),
}
MULTIKEY_PHRASINGS = {
    "magic": Phrasing("special magic number", _RULER_HEAD, "The special magic number for {name} is {key}.",
                      "\nWhat is the special magic number for {name}? The special magic number for {name} is"),
    "ruler": Phrasing("special magic number", _RULER_HEAD, "One of the special magic numbers for {name} is: {key}.",
                      "\nWhat is the special magic number for {name} mentioned in the provided text? "
                      "The special magic number for {name} mentioned in the provided text is"),
    "named": Phrasing("{phrase}", "Some {phrase}s are mentioned in the text below. Remember them.\n", "The {phrase} for {name} is {key}.",
                      "\nWhat is the {phrase} for {name}? The {phrase} for {name} is"),
    "access-code": Phrasing("access code", "Some access codes are mentioned in the text below. Remember them.\n", "The access code for {name} is {key}.",
                            "\nWhat is the access code for {name}? The access code for {name} is", held_out=True),
    "secret-number": Phrasing("secret number", "Some secret numbers are mentioned in the text below. Remember them.\n",
                              "The secret number for {name} is {key}.",
                              "\nWhat is the secret number for {name}? The secret number for {name} is", held_out=True),
}
PHRASINGS = {"passkey": PASSKEY_PHRASINGS, "multikey": MULTIKEY_PHRASINGS}


def phrasing_names(task: str, held_out: bool) -> tuple[str, ...]:
    """The names of ``task``'s held-out phrasings (evaluation only), or of its training ones."""
    return tuple(name for name, say in PHRASINGS[task].items() if say.held_out == held_out)


def worded(task: str, name: str, seed: int) -> Phrasing:
    """``task``'s phrasing ``name`` as the sample of ``seed`` says it: a ``{phrase}`` drawn and filled in.

    The phrase has its own random stream, so the samples of the fixed phrasings stay as they were."""
    table = PHRASINGS[task]
    if name not in table:
        raise InvalidArgumentError("phrasing", f"must be one of {', '.join(table)} for {task}, got {name!r}")
    say = table[name]
    rng = random.Random(f"phrase-{seed}")
    phrase = f"{rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}"
    return replace(say, **{f: getattr(say, f).replace("{phrase}", phrase) for f in ("key_phrase", "header", "needle", "question")})


class TokenEncoder(Protocol):
    def encode(self, text: str) -> Sequence[int]: ...


@dataclass(frozen=True)
class RetrievalSample:
    """One probe: feed ``prompt``, compare what the model writes with ``answer``."""

    task: str
    prompt: str
    question: str  # the prompt's tail after the haystack; evaluations can feed it through decode steps
    completion: str  # the ideal continuation of ``prompt``; training documents append it
    answer: tuple[str, ...]  # the values a correct reply names (one number, or every chained variable)
    context_tokens: int  # the prompt's length in the tokenizer's tokens
    depth: float | None  # where the (queried) needle sits, 0 = start of the filler, 1 = end; None: no needle (common words)
    followups: tuple[str, ...] = ()  # questions about the other needles, each with its answer: training may append them

    @property
    def context(self) -> str:
        """The haystack: the prompt without its question."""
        return self.prompt[: len(self.prompt) - len(self.question)]

    def is_correct(self, generated: str) -> bool:
        """Passkey and needle: the first number generated equals the key. Variable tracking: the set of names matches."""
        if self.task == "vartrack":
            return set(re.findall(r"\b[A-Z]{5}\b", generated)) == set(self.answer)
        return first_number(generated) == self.answer[0]

    def score(self, generated: str) -> float:
        """1.0 or 0.0 by :meth:`is_correct`; a task with partial credit (common words) overrides it."""
        return float(self.is_correct(generated))


def first_number(text: str) -> str | None:
    m = re.search(r"\d+", text)
    return m.group(0) if m else None


def _check(context_tokens: int, depth: float) -> None:
    if isinstance(context_tokens, bool) or not isinstance(context_tokens, int) or context_tokens < 64:
        raise InvalidArgumentError("context_tokens", f"must be an integer >= 64, got {context_tokens!r}")
    if not 0.0 <= depth <= 1.0:
        raise InvalidArgumentError("depth", f"must be in [0, 1], got {depth!r}")


def fill(tokenizer: TokenEncoder, context_tokens: int, build: Callable[[int], str]) -> tuple[str, int]:
    """The longest ``build(n)`` whose token count stays within ``context_tokens``, and that count.

    ``build(n)`` is the prompt with ``n`` pieces of filler (haystack pieces around the needles, or words of a
    list), header and question included. Starts from a linear estimate, then steps a piece at a time.
    """
    def text_for(n: int) -> tuple[str, int]:
        text = build(n)
        return text, len(tokenizer.encode(text))

    base, base_len = text_for(0)
    if base_len > context_tokens:
        raise InvalidArgumentError("context_tokens", f"must be at least {base_len} (the task's text without filler), got {context_tokens}")
    probe, probe_len = text_for(50)
    per_sentence = max((probe_len - base_len) / 50, 1e-6)
    n = max(int((context_tokens - base_len) / per_sentence), 0)
    text, length = text_for(n)
    while length > context_tokens and n > 0:
        n -= 1
        text, length = text_for(n)
    while True:
        longer, longer_len = text_for(n + 1)
        if longer_len > context_tokens:
            return text, length
        n, text, length = n + 1, longer, longer_len


def _insert(filler: list[str], needles: list[tuple[float, str]], joiner: str = " ") -> str:
    """Haystack pieces with each needle placed after ``round(depth * len(filler))`` of them."""
    slots: dict[int, list[str]] = {}
    for depth, needle in needles:
        slots.setdefault(round(depth * len(filler)), []).append(needle)
    parts: list[str] = []
    for i in range(len(filler) + 1):
        parts.extend(slots.get(i, []))
        if i < len(filler):
            parts.append(filler[i])
    return joiner.join(parts)


def passkey(tokenizer: TokenEncoder, context_tokens: int, depth: float, seed: int, haystack: str = "noise", split: str = "validation",
            phrasing: str = "landmark") -> RetrievalSample:
    """A five-digit pass key at ``depth`` in the haystack, said and asked for in one of :data:`PASSKEY_PHRASINGS`
    (Landmark Attention's by default: the prompt ends with "The pass key is")."""
    _check(context_tokens, depth)
    say = worded("passkey", phrasing, seed)
    stack = Haystack(haystack, seed, split)
    key = str(random.Random(seed).randint(10000, 99999))
    needle = say.needle.format(key=key)
    question = say.question
    prompt, n = fill(tokenizer, context_tokens, lambda k: say.header + _insert(stack.take(k), [(depth, needle)], stack.joiner) + question)
    return RetrievalSample("passkey", prompt, question, f" {key}.", (key,), n, depth)


def multikey_needle(tokenizer: TokenEncoder, context_tokens: int, depth: float, seed: int, num_distractors: int = 4, haystack: str = "noise",
                    split: str = "validation", phrasing: str = "magic") -> RetrievalSample:
    """Multi-key needle: 1 + ``num_distractors`` keyed seven-digit numbers, one asked for.

    RULER's task with the needle and answer phrased as the same sentence, "The special magic number for
    KEY is VALUE." (RULER writes "One of the special magic numbers for KEY is: VALUE." and ends its
    prompt "... for KEY mentioned in the provided text is", which puts six tokens between key and answer).
    The sample's ``followups`` ask about the distractors too, in random order (RULER's multi-query variant);
    drawn after everything else, they leave the sample itself as it was.
    """
    _check(context_tokens, depth)
    if isinstance(num_distractors, bool) or not isinstance(num_distractors, int) or not 0 <= num_distractors <= 64:
        raise InvalidArgumentError("num_distractors", f"must be an integer in [0, 64], got {num_distractors!r}")
    say = worded("multikey", phrasing, seed)
    stack = Haystack(haystack, seed, split)
    rng = random.Random(seed)
    keys = rng.sample([f"{a}-{n}" for a in ADJECTIVES for n in NOUNS], num_distractors + 1)
    values = [str(rng.randint(1_000_000, 9_999_999)) for _ in keys]
    needles = [(depth, say.needle.format(name=keys[0], key=values[0]))]
    needles += [(rng.random(), say.needle.format(name=k, key=v)) for k, v in zip(keys[1:], values[1:])]
    question = say.question.format(name=keys[0])
    prompt, n = fill(tokenizer, context_tokens, lambda k: say.header + _insert(stack.take(k), needles, stack.joiner) + question)
    followups = tuple(f"{say.question.format(name=keys[i])} {values[i]}." for i in rng.sample(range(1, len(keys)), len(keys) - 1))
    return RetrievalSample("multikey", prompt, question, f" {values[0]}.", (values[0],), n, depth, followups)


def variable_tracking(tokenizer: TokenEncoder, context_tokens: int, depth: float, seed: int, num_hops: int = 4, haystack: str = "noise",
                      split: str = "validation") -> RetrievalSample:
    """RULER's variable tracking: ``VAR A = value`` then ``num_hops`` links ``VAR B = VAR A``; name every variable."""
    _check(context_tokens, depth)
    if isinstance(num_hops, bool) or not isinstance(num_hops, int) or not 1 <= num_hops <= 16:
        raise InvalidArgumentError("num_hops", f"must be an integer in [1, 16], got {num_hops!r}")
    stack = Haystack(haystack, seed, split)
    rng = random.Random(seed)
    names: list[str] = []
    while len(names) < num_hops + 1:
        name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if name not in names:
            names.append(name)
    value = str(rng.randint(10000, 99999))
    # the chain keeps its order: the first link at ``depth``, later links spread after it
    depths = sorted([depth] + [depth + (1.0 - depth) * rng.random() for _ in range(num_hops)])
    links = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
    head = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n"
    question = (f"\nQuestion: Find all variables that are assigned the value {value} in the text above. Answer: According to the chain(s) "
                f"of variable assignment in the text above, {num_hops + 1} variables are assigned the value {value}, they are:")
    prompt, n = fill(tokenizer, context_tokens, lambda k: head + _insert(stack.take(k), list(zip(depths, links)), stack.joiner) + question)
    return RetrievalSample("vartrack", prompt, question, " " + " ".join(names) + ".", tuple(names), n, depth)


GENERATORS: dict[str, Callable[..., RetrievalSample]] = {"passkey": passkey, "multikey": multikey_needle, "vartrack": variable_tracking}


def make_sample(task: str, tokenizer: TokenEncoder, context_tokens: int, depth: float, seed: int, haystack: str = "noise",
                split: str = "validation", phrasing: str | None = None) -> RetrievalSample:
    """The sample of ``task`` (one of :data:`TASKS`) with that length, depth and seed, hidden in that kind of haystack,
    in one of the task's :data:`PHRASINGS` (None: the task's first; variable tracking has only RULER's)."""
    if task not in GENERATORS:
        raise InvalidArgumentError("task", f"must be one of {list(TASKS)}, got {task!r}")
    if phrasing is not None and task not in PHRASINGS:
        raise InvalidArgumentError("phrasing", f"must be None for {task}, which has only RULER's wording, got {phrasing!r}")
    extra = {"phrasing": phrasing} if phrasing is not None else {}
    return GENERATORS[task](tokenizer, context_tokens, depth, seed, haystack=haystack, split=split, **extra)
