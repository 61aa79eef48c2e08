"""kvtier's Mamba2 mixer against HF transformers' BambaMixer on the same random weights: one sequence whole, and
several sequences sharing steps as the engine schedules them (decodes first, prefill chunks split off the SSD
chunk grid, state carried in pool slots)."""

from __future__ import annotations

import math

import pytest
import torch

from kvtier.errors import InvalidArgumentError
from kvtier.models.config import Mamba2Config, parse_time_step_limit
from kvtier.models.mamba2 import Mamba2Mixer
from kvtier.ssm.metadata import MambaMetadata, StateSpan

NONE = torch.zeros(0, dtype=torch.long)
RAW = dict(hidden_size=64, mamba_n_heads=4, mamba_d_head=32, mamba_n_groups=2, mamba_d_state=16, mamba_d_conv=4, mamba_expand=2,
           mamba_chunk_size=16, mamba_conv_bias=True, mamba_proj_bias=False, rms_norm_eps=1e-6, time_step_limit=(0.0, float("inf")))


def _pair(seed: int = 0, **overrides):
    """HF's BambaMixer with every parameter random, and ours holding the same weights."""
    raw = {**RAW, **overrides}
    import transformers
    from transformers.models.bamba.modeling_bamba import BambaMixer

    cfg = transformers.BambaConfig(**raw, num_hidden_layers=2, attn_layer_indices=[1], num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=128, vocab_size=64)
    torch.manual_seed(seed)
    hf = BambaMixer(cfg, layer_idx=0).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.3)
        hf.A_log.uniform_(-1.0, 1.5)
        hf.norm.weight.uniform_(0.5, 1.5)
    ours = Mamba2Mixer(Mamba2Config.from_bamba(raw))
    ours.load_state_dict(hf.state_dict())
    return hf, ours


def _pool(mixer: Mamba2Mixer, slots: int):
    conv, ssm = mixer.state_shapes()
    return torch.zeros(slots, *conv), torch.zeros(slots, *ssm)


@pytest.mark.parametrize("limit", [(0.0, float("inf")), (0.0, 0.05)])
def test_one_sequence_matches_hf(limit):
    hf, ours = _pair(time_step_limit=limit)
    x = torch.randn(1, 45, 64)
    with torch.no_grad():
        ref = hf(x)[0]
        conv, ssm = _pool(ours, 1)
        got = ours(x[0], conv, ssm, MambaMetadata(NONE, (StateSpan(0, 45, 0),), NONE))
    assert (got - ref).abs().max() < 1e-5


def test_sequences_sharing_steps_in_chunks_and_decodes_match_each_alone():
    hf, ours = _pair(seed=1)
    lengths = {0: 30, 1: 25, 2: 16}
    inputs = {s: torch.randn(n, 64) for s, n in lengths.items()}
    with torch.no_grad():
        refs = {s: hf(x[None])[0] for s, x in inputs.items()}
    # (decodes: (slot, position)), (prefills: (slot, start, end)); chunks of 10 and 19 tokens split the 16-token SSD chunks
    steps = [((), ((0, 0, 10), (1, 0, 19))),
             ((), ((0, 10, 30), (1, 19, 20), (2, 0, 12))),
             *[(((1, 20 + i), (2, 12 + i)), ()) for i in range(4)],
             (((1, 24),), ())]
    conv, ssm = _pool(ours, 3)
    seen = {s: torch.full((n, 64), math.nan) for s, n in lengths.items()}
    with torch.no_grad():
        for decodes, prefills in steps:
            rows = [inputs[s][p:p + 1] for s, p in decodes] + [inputs[s][a:z] for s, a, z in prefills]
            spans, start = [], len(decodes)
            for s, a, z in prefills:
                spans.append(StateSpan(start, z - a, s))
                start += z - a
            out = ours(torch.cat(rows), conv, ssm, MambaMetadata(torch.tensor([s for s, _ in decodes], dtype=torch.long), tuple(spans), NONE))
            for i, (s, p) in enumerate(decodes):
                seen[s][p] = out[i]
            for span, (s, a, z) in zip(spans, prefills):
                seen[s][a:z] = out[span.start:span.start + span.length]
    for s in lengths:
        assert (seen[s] - refs[s]).abs().max() < 1e-5, s


@pytest.mark.parametrize("value, expected", [(None, (0.0, math.inf)), ([0.0, {"__float__": "Infinity"}], (0.0, math.inf)),
                                             ([0.001, 0.1], (0.001, 0.1)), (["0", "Infinity"], (0.0, math.inf))])
def test_time_step_limit_reads_every_form_config_json_writes(value, expected):
    assert parse_time_step_limit(value) == expected


@pytest.mark.parametrize("value", [[1.0], [0.5, 0.1], "fast", [-1.0, 1.0]])
def test_a_bad_time_step_limit_names_the_field(value):
    with pytest.raises(InvalidArgumentError, match="time_step_limit"):
        parse_time_step_limit(value)
