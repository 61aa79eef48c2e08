"""The offline API in vLLM's shape: ``LLM(model=..., **engine_args).generate(prompts, SamplingParams(...))``."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from tqdm.auto import tqdm

from kvtier.config import EngineArgs
from kvtier.engine.input_processor import PromptInput
from kvtier.engine.llm_engine import LLMEngine
from kvtier.engine.metrics import engine_metrics
from kvtier.errors import InvalidArgumentError
from kvtier.models.embedded import DEFAULT_MODEL
from kvtier.outputs import RequestOutput
from kvtier.sampling_params import BeamSearchParams, SamplingParams
from kvtier.tokenizer import Tokenizer

Params = SamplingParams | BeamSearchParams


class LLM:
    """One engine, driven to completion for each call."""

    def __init__(self, model: str = DEFAULT_MODEL, **engine_args: object) -> None:
        unknown = set(engine_args) - EngineArgs.field_names()
        if unknown:
            name = sorted(unknown)[0]
            raise InvalidArgumentError(name, f"is not an engine argument; known: {', '.join(sorted(EngineArgs.field_names()))}")
        self.engine = LLMEngine(EngineArgs(model=model, **engine_args))

    def get_tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    def get_metrics(self) -> dict[str, float]:
        return engine_metrics(self.engine)

    def generate(
        self,
        prompts: PromptInput | Sequence[PromptInput],
        sampling_params: Params | Sequence[Params] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in prompt order."""
        prompt_list = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        if not prompt_list:
            raise InvalidArgumentError("prompts", "must hold at least one prompt")
        params = self._params_per_prompt(sampling_params, len(prompt_list))
        inputs = [self.engine.inputs.process(p, sp) for p, sp in zip(prompt_list, params)]  # check everything before queueing anything
        ids = [self.engine.add_request(inp, sp) for inp, sp in zip(inputs, params)]
        return self._run(ids, use_tqdm)

    def beam_search(self, prompts: PromptInput | Sequence[PromptInput], params: BeamSearchParams) -> list[RequestOutput]:
        """Beam search; each output lists the ``beam_width`` best hypotheses, best first."""
        if not isinstance(params, BeamSearchParams):
            raise InvalidArgumentError("params", "must be a BeamSearchParams")
        return self.generate(prompts, params, use_tqdm=False)

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: Params | Sequence[Params] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Render each conversation through the checkpoint's chat template, then generate."""
        if not isinstance(messages, list) or not messages:
            raise InvalidArgumentError("messages", "must be a non-empty list of {'role', 'content'} dicts (or a list of such lists)")
        conversations = messages if isinstance(messages[0], list) else [messages]
        tok = self.engine.tokenizer
        prompts = [{"prompt_token_ids": tok.encode(tok.apply_chat_template(c, add_generation_prompt), add_special_tokens=False)} for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def stream(self, prompt: PromptInput, sampling_params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield the request's output after every step that added tokens; text is cumulative."""
        rid = self.engine.add_request(prompt, sampling_params or SamplingParams(), stream=True)
        try:
            while True:
                for out in self.engine.step():
                    if out.request_id == rid:
                        yield out
                        if out.finished:
                            return
        finally:
            self.engine.abort_request(rid)

    def _params_per_prompt(self, sampling_params: Params | Sequence[Params] | None, n: int) -> list[Params]:
        if sampling_params is None:
            return [SamplingParams()] * n
        if isinstance(sampling_params, (SamplingParams, BeamSearchParams)):
            return [sampling_params] * n
        params = list(sampling_params)
        if len(params) != n:
            raise InvalidArgumentError("sampling_params", f"a list must have one entry per prompt ({n}), got {len(params)}")
        return params

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        wanted = set(ids)
        bar = tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm, dynamic_ncols=True)
        try:
            while wanted - done.keys():
                for out in self.engine.step():
                    if out.finished and out.request_id in wanted:
                        done[out.request_id] = out
                        bar.update(1)
        finally:
            bar.close()
        return [done[i] for i in ids]
