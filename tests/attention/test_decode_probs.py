"""A decode step's attention probabilities, handed to whoever asks (a KV method that scores keys), equal HF's eager
attention weights on the same weights: every layer, head and key position, with full attention and a sliding window."""

from __future__ import annotations

import pytest
import torch
import transformers

from kvtier import LLM, SamplingParams
from tests.engine.test_hf_parity import prompts_of
from tests.hf_checkpoints import save_hf_checkpoint


@pytest.mark.parametrize("arch,overrides", [("LlamaForCausalLM", {}), ("MistralForCausalLM", {"sliding_window": 20})], ids=["full", "window-20"])
def test_decode_probabilities_match_hf_attention_weights(tmp_path, tokenizer_files, arch, overrides):
    path = save_hf_checkpoint(tmp_path, tokenizer_files, arch, **overrides)
    llm = LLM(str(path), dtype="float32", kv_cache_memory=1 << 22)
    runner = llm.engine.runner
    inner = runner.execute
    captured: list[dict[int, torch.Tensor]] = []
    runner.execute = lambda step: captured.append((out := inner(step, decode_probs=True)).decode_probs) or out
    prompts = prompts_of([37, 5], 512, seed=11)  # decoded together: two rows of one decode group, of different lengths
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    by_len = {}
    for step in captured:
        for probs in step.values():
            by_len.setdefault(probs.shape[-1], []).append(probs)
    checked = 0
    for prompt, out in zip(prompts, outs):
        ids = prompt + out.outputs[0].token_ids
        with torch.no_grad():
            ref = torch.stack(hf(torch.tensor([ids]), output_attentions=True).attentions)[:, 0]  # [layers, heads, T, T]
        for pos in range(len(prompt), len(ids) - 1):  # decode queries: the generated tokens fed back
            want = ref[:, :, pos, : pos + 1]
            mine = [p for p in by_len.get(pos + 1, []) if torch.allclose(p, want, atol=1e-5)]
            assert mine, f"no captured decode at position {pos} matches HF's attention weights"
            checked += 1
    assert checked == 2 * 5
    if "sliding_window" in overrides:
        context = len(prompts[0]) + 5
        last = by_len[context][0]  # the query at context - 1 sees keys context - 20 .. context - 1
        assert last[:, :, : context - 20].abs().max() == 0, "keys behind the window get no probability"
        assert torch.allclose(last[:, :, context - 20 :].sum(-1), torch.ones(2, 4)), "the window's keys hold all of it"
