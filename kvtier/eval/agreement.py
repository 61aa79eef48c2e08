"""Agreement with the full cache: how far a KV method moves the model's next-token distributions.

The full cache continues each prompt greedily; the method's engine is then forced along the same tokens, so both
score the same positions. Per position: KL(full || method) of the next-token distributions, and whether the top-1
token is the same. Prompts are windows of held-out text, which neither the model nor its tokenizer trained on.
"""

from __future__ import annotations

import random

import torch

from kvtier.entrypoints.llm import LLM
from kvtier.eval.haystacks import source_texts
from kvtier.sampling.logits_processors import ForcedTokens, RecordLogits
from kvtier.sampling_params import SamplingParams


def text_windows(llm: LLM, context_tokens: int, count: int, seed: int, after: int = 0) -> list[list[int]]:
    """``count`` windows of ``context_tokens`` tokens of held-out text, at seeded offsets, each followed by the ``after``
    tokens that come next in the text (what perplexity scores)."""
    tok = llm.get_tokenizer()
    ids = tok.encode(" ".join(source_texts("heldout")), add_special_tokens=False)
    span = context_tokens + after
    if len(ids) <= span:
        ids = ids * (span // max(1, len(ids)) + 2)
    rng = random.Random(seed)
    bos = tok.encode("", add_special_tokens=True)  # the model's leading special tokens, if any
    return [bos + ids[(o := rng.randrange(len(ids) - span)) : o + span - len(bos)] for _ in range(count)]


def continue_greedily(llm: LLM, prompts: list[list[int]], tokens: int, forced: list[list[int]] | None = None) -> list[tuple[list[int], torch.Tensor]]:
    """Each prompt's ``tokens`` next tokens (greedy, or ``forced``) and the logits [tokens, vocab] each was chosen from."""
    records = [RecordLogits() for _ in prompts]
    params = [SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True,
                             logits_processors=[r] + ([ForcedTokens(forced[i])] if forced else [])) for i, r in enumerate(records)]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [(list(o.outputs[0].token_ids), torch.stack(r.logits)) for o, r in zip(outs, records)]


def agreement(reference: list[tuple[list[int], torch.Tensor]], method: list[tuple[list[int], torch.Tensor]]) -> dict[str, float]:
    """Mean KL(full || method) in nats and the top-1 agreement over every position of every continuation."""
    full = torch.cat([logits for _, logits in reference]).log_softmax(-1)
    mine = torch.cat([logits for _, logits in method]).log_softmax(-1)
    kl = (full.exp() * (full - mine)).sum(-1)
    return {"kl": kl.mean().item(), "top1": (full.argmax(-1) == mine.argmax(-1)).float().mean().item()}
