"""The text a retrieval needle hides in, of several kinds, drawn from a seed.

- ``noise``: Landmark Attention's filler (Mohtashami & Jaggi, 2023), five sentences repeated.
- ``code``: consecutive lines of Python source from one split of the training corpus (``train`` for
  training documents, ``validation`` for evaluation), file after file.
- ``prose``: the docstrings and comments of the same split's files, sentence by sentence.
- ``mixed``: stretches of code and prose in turn.
- ``heldout``: IDLE's text files that ship with Python (``idlelib/*.txt``: its NEWS, history, README,
  credits and notes), sentence by sentence. The training corpus reads only ``*.py`` files, so neither
  the shipped models nor their tokenizer saw this text: it is for evaluation only.

A ``Haystack`` hands out as many pieces as a context asks for (``take``); the pieces are the places a
needle may sit between. The same kind, seed and split give the same pieces on every machine with the
same Python.
"""

from __future__ import annotations

import ast
import functools
import io
import random
import re
import sysconfig
import tokenize
import warnings
from pathlib import Path

from kvtier.errors import InvalidArgumentError
from kvtier.training.corpus import read_texts, split_corpus

FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
HAYSTACKS = ("noise", "code", "prose", "mixed", "heldout")
SPLITS = ("train", "validation")
HELDOUT_FILES = ("CREDITS.txt", "HISTORY.txt", "NEWS.txt", "NEWS2x.txt", "README.txt", "TODO.txt", "extend.txt")  # in idlelib/
_SENTENCE = re.compile(r"(?<=[.!?])\s+")


class Haystack:
    """An endless, seeded run of one kind's pieces, joined by ``joiner`` (with any needles) into a haystack."""

    def __init__(self, kind: str, seed: int, split: str = "validation") -> None:
        if kind not in HAYSTACKS:
            raise InvalidArgumentError("haystack", f"must be one of {', '.join(HAYSTACKS)}, got {kind!r}")
        if split not in SPLITS:
            raise InvalidArgumentError("split", f"must be one of {', '.join(SPLITS)}, got {split!r}")
        self.kind = kind
        self.joiner = "\n" if kind in ("code", "mixed") else " "
        self._rng = random.Random(seed)
        self._split = split
        self._pieces: list[str] = []

    def take(self, n: int) -> list[str]:
        """The first ``n`` pieces (drawn further as needed; the same every time)."""
        while len(self._pieces) < n:
            self._pieces.extend(self._stretch())
        return self._pieces[:n]

    def _stretch(self) -> list[str]:
        """The next run of pieces: a whole cycle of filler, or one source from a random start to its end."""
        if self.kind == "noise":
            return list(FILLER)
        kind = self._rng.choice(("code", "prose")) if self.kind == "mixed" else self.kind
        sources = _heldout_sentences() if kind == "heldout" else _split_units(self._split, kind)
        source = sources[self._rng.randrange(len(sources))]
        return list(source[self._rng.randrange(len(source)):])


def source_texts(kind: str, split: str = "validation") -> list[str]:
    """One text per source file of a kind (``code``, ``prose`` or ``heldout``; the split does not apply to held-out
    text): what perplexity on that kind of text is measured over."""
    if kind not in ("code", "prose", "heldout"):
        raise InvalidArgumentError("haystack", f"must be code, prose or heldout for source texts, got {kind!r}")
    if split not in SPLITS:
        raise InvalidArgumentError("split", f"must be one of {', '.join(SPLITS)}, got {split!r}")
    units = _heldout_sentences() if kind == "heldout" else _split_units(split, kind)
    return [("\n" if kind == "code" else " ").join(unit) for unit in units]


@functools.cache
def _split_units(split: str, kind: str) -> tuple[tuple[str, ...], ...]:
    """Per file of the split: its non-blank lines (code), or its docstring and comment sentences (prose)."""
    files = getattr(split_corpus(), split)
    units = [_code_lines(text) if kind == "code" else _prose_sentences(text) for text in read_texts(files)]
    return tuple(u for u in units if u)


def _code_lines(text: str) -> tuple[str, ...]:
    return tuple(line for line in text.splitlines() if line.strip())


def _prose_sentences(text: str) -> tuple[str, ...]:
    """The file's docstrings and comments, flattened to one line each and split into sentences."""
    parts: list[str] = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # old stdlib files with invalid escapes warn when parsed; their text is still prose
            tree = ast.parse(text)
        parts += [doc for node in ast.walk(tree) if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  if (doc := ast.get_docstring(node))]
        parts += [tok.string.lstrip("#") for tok in tokenize.generate_tokens(io.StringIO(text).readline) if tok.type == tokenize.COMMENT]
    except (SyntaxError, tokenize.TokenError, ValueError):
        return ()  # a few stdlib test files are deliberately not valid Python
    return _sentences(" ".join(parts))


def _sentences(text: str, longest: int = 200) -> tuple[str, ...]:
    """Sentences, a long one cut at spaces into pieces of about ``longest`` characters, so a needle has places to sit
    and a haystack can end near any token budget."""
    pieces = []
    for sentence in _SENTENCE.split(" ".join(text.split())):
        while len(sentence) > longest and " " in sentence[longest // 2:]:
            cut = sentence.rfind(" ", longest // 2, longest) if " " in sentence[longest // 2:longest] else sentence.index(" ", longest // 2)
            pieces.append(sentence[:cut])
            sentence = sentence[cut + 1:]
        pieces.append(sentence)
    return tuple(p for p in pieces if sum(c.isalpha() for c in p) >= 3)  # not rules of dashes or lone numbers


@functools.cache
def _heldout_sentences() -> tuple[tuple[str, ...], ...]:
    folder = Path(sysconfig.get_paths()["stdlib"]) / "idlelib"
    missing = [name for name in HELDOUT_FILES if not (folder / name).is_file()]
    if missing:
        raise InvalidArgumentError("haystack", f"'heldout' reads idlelib's text files, and this Python lacks {', '.join(missing)} in {folder}")
    return tuple(_sentences((folder / name).read_text(encoding="utf-8", errors="replace")) for name in HELDOUT_FILES)
