"""A ``SchedulerOutput`` is plain data: pickled and run by a fresh runner over a copy of the KV storage, it gives
exactly the logits the engine's own runner gave (the runner could live in another process)."""

from __future__ import annotations

import pickle

import torch

from kvtier import LLM, SamplingParams
from kvtier.attention.registry import get_backend
from kvtier.cache.kv_storage import KVStorage
from kvtier.engine.model_runner import ModelRunner


def test_pickled_steps_give_the_same_logits_in_a_fresh_runner(llama_dir):
    llm = LLM(str(llama_dir), kv_cache_memory=1 << 22, max_num_batched_tokens=48)
    engine = llm.engine
    steps: list[tuple[bytes, list[torch.Tensor], object]] = []
    own = engine.runner.execute

    def recording(step):
        before = (pickle.dumps(step), [t.clone() for t in engine.storage.tensors()])
        logits = own(step)
        steps.append((*before, logits))
        return logits

    engine.runner.execute = recording
    prompts = [{"prompt_token_ids": [3 + (i * 37 + j * 11) % 500 for j in range(n)]} for i, n in enumerate([70, 9, 33])]
    params = [SamplingParams(n=2, temperature=1.0, seed=1, max_tokens=6, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, prompt_logprobs=2),
              SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)]
    llm.generate(prompts, params, use_tqdm=False)

    mixed = moved = 0
    for blob, tensors, logits in steps:
        storage = KVStorage(engine.memory_plan, engine.device)
        for mine, theirs in zip(storage.tensors(), tensors):
            mine.copy_(theirs)
        step = pickle.loads(blob)
        again = ModelRunner(engine.model, storage, engine.runner.specs, engine.device, get_backend("paged")).execute(step)
        assert again.last.keys() == logits.last.keys() and again.prompt.keys() == logits.prompt.keys()
        assert all(torch.equal(again.last[k], logits.last[k]) for k in logits.last)
        assert all(torch.equal(again.prompt[k], logits.prompt[k]) for k in logits.prompt)
        mixed += len({s.num_tokens > 1 for s in step.seqs}) == 2
        moved += any(step.ops)
    assert mixed and moved, "the steps must include a prefill beside decodes, and block moves (n=2 copies on write)"


def test_the_runner_imports_neither_the_scheduler_nor_the_cache_managers():
    import subprocess
    import sys

    banned = ("kvtier.engine.scheduler", "kvtier.cache.coordinator", "kvtier.cache.full_attention", "kvtier.cache.sliding_window",
              "kvtier.cache.prefix_cache")
    code = f"import sys, kvtier.engine.model_runner; print(sorted(m for m in sys.modules if m in {banned!r}))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
