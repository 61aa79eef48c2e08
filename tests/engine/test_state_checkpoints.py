"""The state at any position: a prefill stops at token t (on or off an SSD chunk and a KV block boundary) and keeps
its cache state; a new sequence resumes from it. Logits must equal an uninterrupted prefill within 1e-5 (fp32),
for both hybrid families and for a pure transformer (whose checkpoint is its K/V blocks alone)."""

from __future__ import annotations

import pytest
import torch

from kvtier import LLM, SamplingParams
from kvtier.errors import InvalidArgumentError
from tests.engine.test_hf_parity import LogitSpy, prompts_of
from tests.hf_checkpoints import HYBRIDS, save_hf_checkpoint

TOL = 1e-5
STEPS = 4
GREEDY = SamplingParams(temperature=0.0, max_tokens=STEPS, ignore_eos=True)


@pytest.fixture(scope="module", params=[*sorted(HYBRIDS), "LlamaForCausalLM"])
def llm(request, tmp_path_factory, tokenizer_files):
    path = save_hf_checkpoint(tmp_path_factory.mktemp(request.param), tokenizer_files, request.param, **HYBRIDS.get(request.param, {}))
    return LLM(str(path), kv_cache_memory=1 << 22, block_size=16)


def run(llm: LLM, prompt: list[int], **kw) -> tuple[list[int], torch.Tensor, str]:
    """Greedy tokens and the logits of every step of one request, and its id (a fresh spy each call; older ones go on recording unread)."""
    spy = LogitSpy(llm)
    engine = llm.engine
    rid = engine.add_request({"prompt_token_ids": prompt}, GREEDY, **kw)
    while engine.has_unfinished_requests():
        outs = engine.step()
        for out in outs:
            if out.request_id == rid and out.finished:
                tokens = out.outputs[0].token_ids
    [logits] = spy.by_seq.values()
    return tokens, torch.stack(logits), rid


@pytest.mark.parametrize("t", [7, 16, 21, 32, 45])  # SSD chunks and KV blocks are 16 tokens: on and off their edges
def test_resuming_from_a_checkpoint_at_any_position_matches_an_uninterrupted_prefill(llm, t):
    prompt, other = prompts_of([60], 512, seed=t)[0], prompts_of([9], 512, seed=100 + t)[0]
    whole_tokens, whole, _ = run(llm, prompt)
    split_tokens, split, rid = run(llm, prompt, checkpoint_at=[t])
    assert split_tokens == whole_tokens and (split - whole).abs().max().item() <= TOL, "stopping the prefill at t changes nothing"
    [ckpt] = llm.engine.take_checkpoints(rid)
    assert ckpt.token_ids == tuple(prompt[:t])
    resumed_tokens, resumed, _ = run(llm, prompt, start_from=ckpt)
    assert resumed_tokens == whole_tokens and (resumed - whole).abs().max().item() <= TOL
    branch = prompt[:t] + other  # another continuation of the same t tokens
    _, branch_whole, _ = run(llm, branch)
    _, branch_resumed, _ = run(llm, branch, start_from=ckpt)
    assert (branch_resumed - branch_whole).abs().max().item() <= TOL
    assert llm.engine.scheduler.running == [] and llm.get_metrics()["kv_blocks_used"] > 0, "the checkpoint still holds its blocks"
    llm.engine.release_checkpoint(ckpt)
    m = llm.get_metrics()
    assert m["kv_blocks_used"] == 0 and m.get("mamba_slots_used", 0) == 0, "releasing the checkpoint gives every block and slot back"


def test_two_sequences_resumed_from_one_checkpoint_at_once_do_not_disturb_it_or_each_other(llm):
    prompt = prompts_of([40], 512, seed=7)[0]
    a, b = prompt[:23] + [5, 6, 7], prompt[:23] + [8, 9]
    _, _, rid = run(llm, prompt, checkpoint_at=[23, 40])
    first, last = llm.engine.take_checkpoints(rid)
    assert (first.num_tokens, last.num_tokens) == (23, 40)
    outs = llm.generate([{"prompt_token_ids": a}, {"prompt_token_ids": b}], GREEDY, use_tqdm=False)
    expect = {tuple(o.outputs[0].token_ids) for o in outs}
    for ckpt in (first, first):  # twice: the first pair's writes must not have touched the checkpoint
        ids = [llm.engine.add_request({"prompt_token_ids": p}, GREEDY, start_from=ckpt) for p in (a, b)]
        got = {}
        while llm.engine.has_unfinished_requests():
            for out in llm.engine.step():
                if out.finished:
                    got[out.request_id] = tuple(out.outputs[0].token_ids)
        assert {got[i] for i in ids} == expect
    for ckpt in (first, last):
        llm.engine.release_checkpoint(ckpt)
    assert llm.get_metrics()["kv_blocks_used"] == 0


def test_bad_checkpoint_arguments_are_refused_naming_the_field(llm):
    prompt = prompts_of([20], 512, seed=9)[0]
    for positions in ([0], [21], [5, 5], [9, 4], ["3"]):
        with pytest.raises(InvalidArgumentError, match="checkpoint_at"):
            llm.engine.add_request({"prompt_token_ids": prompt}, GREEDY, checkpoint_at=positions)
    _, _, rid = run(llm, prompt, checkpoint_at=[10])
    [ckpt] = llm.engine.take_checkpoints(rid)
    for bad in (prompt[:10], [1] + prompt[1:]):
        with pytest.raises(InvalidArgumentError, match="start_from: the prompt must extend the checkpoint's 10 tokens"):
            llm.engine.add_request({"prompt_token_ids": bad}, GREEDY, start_from=ckpt)
    with pytest.raises(InvalidArgumentError, match="checkpoint_at: must be strictly increasing positions in \\[11, 20\\]"):
        llm.engine.add_request({"prompt_token_ids": prompt}, GREEDY, start_from=ckpt, checkpoint_at=[10])
    llm.engine.release_checkpoint(ckpt)
    with pytest.raises(InvalidArgumentError, match="start_from: must be a StateCheckpoint from this engine that is not released"):
        llm.engine.add_request({"prompt_token_ids": prompt}, GREEDY, start_from=ckpt)
    assert not llm.engine.has_unfinished_requests() and llm.get_metrics()["kv_blocks_used"] == 0
