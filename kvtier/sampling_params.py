"""Per-request generation settings, with vLLM's field names and defaults, validated on construction.

Validation happens here, once, so the sampler and scheduler can trust every field; each bad
field raises ``InvalidArgumentError`` naming that field and its allowed range.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvtier.errors import InvalidArgumentError

MAX_LOGPROBS = 20  # OpenAI's API caps top_logprobs at 20; we follow it
GREEDY_EPS = 1e-5  # below this temperature sampling is argmax (dividing by it would overflow float32)
_SEED_MIN, _SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed accepts


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_int(name: str, v: object, low: int, high: int | None = None, optional: bool = False, low_text: str | None = None) -> None:
    """``v`` is an int in [low, high] (or None when ``optional``); the message states the range."""
    if v is None and optional:
        return
    allowed = f"in [{low}, {high}]" if high is not None else f">= {low_text or low}"
    prefix = "None or " if optional else ""
    if not _is_int(v) or v < low or (high is not None and v > high):
        raise InvalidArgumentError(name, f"must be {prefix}an integer {allowed}, got {v!r}")


def _check_float(name: str, v: object, allowed: str = "") -> float:
    """``v`` is a finite real number (bools and NaN/inf are rejected); returned as float."""
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise InvalidArgumentError(name, f"must be a finite number{' ' + allowed if allowed else ''}, got {v!r}")
    return float(v)


def _check_range(name: str, v: object, allowed: str, test: Callable[[float], bool]) -> float:
    """``v`` is a finite number passing ``test``; ``allowed`` describes the range in the message."""
    x = _check_float(name, v, allowed)
    if not test(x):
        raise InvalidArgumentError(name, f"must be {allowed}, got {v!r}")
    return x


LogitsProcessor = Callable[..., Any]
"""vLLM's per-request hook: ``fn(output_token_ids, logits) -> logits`` or ``fn(prompt_token_ids, output_token_ids, logits) -> logits``
on one sequence's float32 logits row [vocab], before penalties and sampling (logprobs still report the model's own)."""


def processor_arity(fn: object) -> int:
    """How many arguments a logits processor takes (2 or 3); anything else is a bad ``logits_processors`` entry."""
    try:
        params = inspect.signature(fn).parameters.values()  # type: ignore[arg-type]
    except (TypeError, ValueError):
        params = None
    positional = [p for p in params or () if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
    if not callable(fn) or params is None or len(positional) not in (2, 3):
        raise InvalidArgumentError("logits_processors", f"must be a list of callables taking (output_token_ids, logits) or "
                                                        f"(prompt_token_ids, output_token_ids, logits), got {fn!r}")
    return len(positional)


def _check_bool(name: str, v: object) -> None:
    if not isinstance(v, bool):
        raise InvalidArgumentError(name, f"must be True or False, got {v!r}")


@dataclass
class SamplingParams:
    """How one request is sampled and when it stops (vLLM's fields and defaults).

    ``top_k`` of -1 is normalised to 0 (both disable it), ``stop`` to a list of strings and
    ``stop_token_ids`` to a list of ints, so consumers see a single representation.
    """

    n: int = 1
    best_of: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    use_beam_search: bool = False
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    logits_processors: list[LogitsProcessor] | None = None

    def __post_init__(self) -> None:
        _check_int("n", self.n, 1)
        _check_int("best_of", self.best_of, self.n, optional=True, low_text=f"n ({self.n})")
        if self.best_of is not None and self.best_of != self.n and not self.use_beam_search:
            raise InvalidArgumentError("best_of", f"must be None or n ({self.n}) without use_beam_search (vLLM v1 does not support it either), "
                                                  f"got {self.best_of!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            setattr(self, name, _check_range(name, getattr(self, name), "in [-2, 2]", lambda x: -2.0 <= x <= 2.0))
        self.repetition_penalty = _check_range("repetition_penalty", self.repetition_penalty, "> 0", lambda x: x > 0)
        self.temperature = _check_range("temperature", self.temperature, ">= 0", lambda x: x >= 0)
        self.top_p = _check_range("top_p", self.top_p, "in (0, 1]", lambda x: 0 < x <= 1)
        if not _is_int(self.top_k) or self.top_k < -1:
            raise InvalidArgumentError("top_k", f"must be -1 or an integer >= 0 (-1 and 0 disable it), got {self.top_k!r}")
        self.top_k = max(self.top_k, 0)
        self.min_p = _check_range("min_p", self.min_p, "in [0, 1]", lambda x: 0 <= x <= 1)
        _check_int("seed", self.seed, _SEED_MIN, _SEED_MAX, optional=True)
        self.stop = _stop_list(self.stop)
        self.stop_token_ids = _stop_token_list(self.stop_token_ids)
        _check_int("max_tokens", self.max_tokens, 1, optional=True)
        if self.max_tokens is None:
            _check_int("min_tokens", self.min_tokens, 0)
        elif not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            raise InvalidArgumentError("min_tokens", f"must be an integer in [0, max_tokens ({self.max_tokens})], got {self.min_tokens!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or not 0 <= value <= MAX_LOGPROBS):
                raise InvalidArgumentError(name, f"must be None or an integer in [0, {MAX_LOGPROBS}] ({MAX_LOGPROBS} is OpenAI's cap), got {value!r}")
        self.length_penalty = _check_float("length_penalty", self.length_penalty)
        for name in ("include_stop_str_in_output", "ignore_eos", "skip_special_tokens", "use_beam_search"):
            _check_bool(name, getattr(self, name))
        _check_early_stopping(self.early_stopping)
        if self.use_beam_search and self.temperature != 0:
            raise InvalidArgumentError("temperature", f"must be 0 when use_beam_search is set (beam search is deterministic), got {self.temperature}")
        self.logits_processors = _processor_list(self.logits_processors)
        if self.logits_processors and self.use_beam_search:
            raise InvalidArgumentError("logits_processors", "must be empty with use_beam_search (beams are ranked by the model's log-probabilities)")

    @property
    def is_greedy(self) -> bool:
        """True when the next token is the argmax: temperature (below 1e-5) or top_k == 1 leave one choice."""
        return self.temperature < GREEDY_EPS or self.top_k == 1

    def clone(self) -> SamplingParams:
        """A deep copy, so a caller can tweak one request's params without aliasing another's lists."""
        return copy.deepcopy(self)


def _check_early_stopping(v: object) -> None:
    if v not in (True, False, "never") or not isinstance(v, (bool, str)):
        raise InvalidArgumentError("early_stopping", f"must be True, False or \"never\" (HF transformers' beam search options), got {v!r}")


def _processor_list(fns: object) -> list[LogitsProcessor]:
    if fns is None:
        return []
    if not isinstance(fns, (list, tuple)):
        raise InvalidArgumentError("logits_processors", f"must be a list of callables, got {fns!r}")
    for fn in fns:
        processor_arity(fn)
    return list(fns)


def _stop_list(stop: object) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) and s for s in stops):
        raise InvalidArgumentError("stop", f"must be a non-empty string or a list of non-empty strings, got {stop!r}")
    return list(stops)


def _stop_token_list(ids: object) -> list[int]:
    if ids is None:
        return []
    if not isinstance(ids, (list, tuple)) or not all(_is_int(t) and t >= 0 for t in ids):
        raise InvalidArgumentError("stop_token_ids", f"must be a list of integer token ids >= 0, got {ids!r}")
    return list(ids)


@dataclass
class BeamSearchParams:
    """Settings of a beam-search request (vLLM's shape, plus HF's ``early_stopping``); validated like ``SamplingParams``.

    ``temperature`` must stay 0: beams are ranked by the model's own log-probabilities (vLLM's beam
    search scores raw log-probabilities too, so a temperature there changes nothing).
    """

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    early_stopping: bool | str = False

    def __post_init__(self) -> None:
        _check_int("beam_width", self.beam_width, 1)
        _check_int("max_tokens", self.max_tokens, 1)
        _check_bool("ignore_eos", self.ignore_eos)
        self.temperature = _check_range("temperature", self.temperature, "0 (beams are ranked by the model's log-probabilities)", lambda x: x == 0)
        self.length_penalty = _check_float("length_penalty", self.length_penalty)
        _check_early_stopping(self.early_stopping)
