"""A request's input, checked and tokenized once, before it touches any engine state.

Every entry point (``LLM.generate``, the async engine behind the server, ``LLMEngine.add_request``) goes
through ``InputProcessor.process``: bad fields raise ``InvalidArgumentError`` naming the field and its
allowed range, and a text prompt is encoded here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvtier.cache.coordinator import KVCacheCoordinator
from kvtier.errors import InvalidArgumentError
from kvtier.sampling_params import BeamSearchParams, SamplingParams
from kvtier.tokenizer import Tokenizer

PromptInput = str | dict


@dataclass(frozen=True)
class EngineInput:
    """A checked request: its prompt as text (if it came as text) and ids, its sampling, and its beam search if any."""

    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    beam: BeamSearchParams | None = None


class InputProcessor:
    def __init__(self, tokenizer: Tokenizer, vocab_size: int, max_model_len: int, kv: KVCacheCoordinator, max_logprobs: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.kv = kv
        self.max_logprobs = max_logprobs

    def process(self, prompt: PromptInput | EngineInput, params: SamplingParams | BeamSearchParams) -> EngineInput:
        """Check ``params`` and ``prompt`` and tokenize the prompt; an ``EngineInput`` passes as it is."""
        if isinstance(prompt, EngineInput):
            return prompt
        self.check_params(params)
        text, ids = self.tokenize_prompt(prompt)
        if isinstance(params, BeamSearchParams):
            return EngineInput(text, ids, SamplingParams(n=params.beam_width, temperature=0.0, max_tokens=params.max_tokens,
                                                         ignore_eos=params.ignore_eos), params)
        if params.use_beam_search:
            beam = BeamSearchParams(params.best_of or params.n, params.max_tokens or 16, params.ignore_eos, 0.0, params.length_penalty,
                                    params.early_stopping)
            return EngineInput(text, ids, params, beam)
        return EngineInput(text, ids, params)

    def tokenize_prompt(self, prompt: PromptInput) -> tuple[str | None, list[int]]:
        """Validate a prompt (text or ``{"prompt_token_ids": [...]}``) and return (text, token ids)."""
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidArgumentError("prompt", "must be a non-empty string")
            ids = self.tokenizer.encode(prompt)
            text = prompt
        elif isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            ids = prompt["prompt_token_ids"]
            text = prompt.get("prompt")
            if not isinstance(ids, list) or not ids:
                raise InvalidArgumentError("prompt_token_ids", "must be a non-empty list of token ids")
            vocab = self.vocab_size
            if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab for t in ids):
                raise InvalidArgumentError("prompt_token_ids", f"every id must be an integer in [0, {vocab})")
        else:
            raise InvalidArgumentError("prompt", f"must be a string or a dict with 'prompt_token_ids', got {type(prompt).__name__}")
        if not ids:
            raise InvalidArgumentError("prompt", "tokenizes to zero tokens")
        if len(ids) >= self.max_model_len:
            raise InvalidArgumentError("prompt", f"has {len(ids)} tokens; it must be shorter than max_model_len ({self.max_model_len})")
        if not self.kv.fits(len(ids) + 1):
            raise InvalidArgumentError("prompt", f"has {len(ids)} tokens, more than the KV cache holds for one sequence "
                                                 f"({self.kv.min_blocks * self.kv.block_size} slots in its smallest layer group)")
        return text, list(ids)

    def check_params(self, params: SamplingParams | BeamSearchParams) -> None:
        if not isinstance(params, (SamplingParams, BeamSearchParams)):
            raise InvalidArgumentError("sampling_params", f"must be SamplingParams or BeamSearchParams, got {type(params).__name__}")
        if isinstance(params, BeamSearchParams):
            width = ("beam_width", params.beam_width)
        else:
            width = ("best_of", params.best_of) if params.best_of else ("n", params.n)
        if width[1] > self.kv.min_blocks:
            raise InvalidArgumentError(width[0], f"must be <= {self.kv.min_blocks}, the KV cache's blocks (a request's sequences run together, "
                                                 f"each on blocks of its own), got {width[1]}")
        if isinstance(params, SamplingParams):
            for name in ("logprobs", "prompt_logprobs"):
                value = getattr(params, name)
                if value is not None and value > self.max_logprobs:
                    raise InvalidArgumentError(name, f"must be <= max_logprobs ({self.max_logprobs}), got {value}")
