"""The engine shared by server connections tokenizes a text prompt once (the server's validation does it, and only
the ids travel on), and its streams deliver the same tokens as the offline engine."""

from __future__ import annotations

import asyncio

from kvtier import LLM, SamplingParams
from kvtier.config import EngineArgs
from kvtier.engine.async_engine import AsyncLLMEngine
from kvtier.engine.llm_engine import LLMEngine


def served_tokens(engine: AsyncLLMEngine, prompt, params: SamplingParams) -> list[int]:
    """Validate (what the server does before submitting), submit, and return the last output's tokens; then shut down."""

    async def run() -> list[int]:
        last = None
        async for _, out in engine.submit([engine.validate(prompt, params)], params):
            last = out
        return last.outputs[0].token_ids

    try:
        return asyncio.run(run())
    finally:
        engine.shutdown()


def test_a_text_prompt_is_tokenized_once_and_generates_as_offline(llama_dir):
    engine = AsyncLLMEngine(LLMEngine(EngineArgs(model=str(llama_dir), kv_cache_memory=1 << 22)))
    calls = []
    encode = engine.engine.tokenizer.encode
    engine.engine.tokenizer.encode = lambda *a, **k: calls.append(a) or encode(*a, **k)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    tokens = served_tokens(engine, "def add(a, b):", params)
    assert len(calls) == 1, calls
    offline = LLM(str(llama_dir), kv_cache_memory=1 << 22).generate("def add(a, b):", params, use_tqdm=False)[0]
    assert tokens == offline.outputs[0].token_ids


def test_an_engine_built_on_its_own_thread_steps_there_and_reports_a_failed_build(llama_dir, tmp_path):
    """``from_engine_args`` (what ``kvtier serve`` uses) builds the engine on the thread that steps it, so one OS thread
    runs all of torch's parallel work; a build that fails raises in the caller."""
    import threading

    import pytest

    from kvtier.errors import KvtierError

    engine = AsyncLLMEngine.from_engine_args(EngineArgs(model=str(llama_dir), kv_cache_memory=1 << 22))
    threads = []
    step = engine.engine.step
    engine.engine.step = lambda: threads.append(threading.current_thread()) or step()
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    tokens = served_tokens(engine, {"prompt_token_ids": [5, 6, 7]}, params)
    assert threads and {t.name for t in threads} == {"kvtier-engine"}
    offline = LLM(str(llama_dir), kv_cache_memory=1 << 22).generate({"prompt_token_ids": [5, 6, 7]}, params, use_tqdm=False)[0]
    assert tokens == offline.outputs[0].token_ids
    with pytest.raises(KvtierError, match="model"):
        AsyncLLMEngine.from_engine_args(EngineArgs(model=str(tmp_path / "missing"), kv_cache_memory=1 << 22))
