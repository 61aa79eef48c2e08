"""The fused C++ kernels the ``cpu`` backend puts into a model (RMSNorm, SiLU-and-mul, rotary embeddings) against the
reference modules computed in float64, on strided views (q and k inside the fused qkv output) and sizes that are no
multiple of the vector width; and the swap itself keeps shared modules shared."""

from __future__ import annotations

import pytest
import torch

from kvtier.kernels.loader import load_kernels
from kvtier.models.config import RopeConfig
from kvtier.models.fused_ops import NativeRMSNorm, NativeRotaryEmbedding, fuse_elementwise
from kvtier.models.layers import GatedMLP, RMSNorm, silu_and_mul
from kvtier.models.rope import RotaryEmbedding


@pytest.fixture(scope="module")
def kernels():
    module, why = load_kernels()
    assert module is not None, why
    return module


@pytest.mark.parametrize("hidden", [512, 37])
def test_rms_norm_matches_float64(kernels, hidden):
    g = torch.Generator().manual_seed(hidden)
    norm = RMSNorm(hidden, 1e-6)
    norm.weight.data = torch.randn(hidden, generator=g)
    wide = torch.randn(9, hidden + 5, generator=g) * 3
    x = wide[:, :hidden]  # rows strided, as a view into a wider projection
    want = RMSNorm(hidden, 1e-6).double()
    want.weight.data = norm.weight.data.double()
    got = NativeRMSNorm(norm, kernels)(x)
    assert got.shape == x.shape
    assert (got.double() - want(x.double())).abs().max().item() <= 1e-5
    three_d = torch.randn(4, 3, hidden, generator=g)
    assert (NativeRMSNorm(norm, kernels)(three_d).double() - want(three_d.double())).abs().max().item() <= 1e-5


@pytest.mark.parametrize("intermediate", [1408, 19])
def test_silu_and_mul_matches_float64(kernels, intermediate):
    x = torch.randn(7, 2 * intermediate, generator=torch.Generator().manual_seed(intermediate)) * 4
    got = kernels.silu_and_mul(x)
    assert (got.double() - silu_and_mul(x.double())).abs().max().item() <= 1e-5


@pytest.mark.parametrize("head_dim, partial", [(64, 1.0), (20, 1.0), (48, 0.5)])
def test_rotary_in_place_matches_float64(kernels, head_dim, partial):
    g = torch.Generator().manual_seed(head_dim)
    rope = RopeConfig(theta=10000.0, partial_rotary_factor=partial)
    rotary = RotaryEmbedding(head_dim, 512, rope, torch.float32)
    heads, kv_heads, tokens = 8, 2, 11
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=g)
    q, k, _ = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k = q.view(tokens, heads, head_dim), k.view(tokens, kv_heads, head_dim)
    positions = torch.randint(0, 512, (tokens,), generator=g)
    reference = RotaryEmbedding(head_dim, 512, rope, torch.float64)
    want_q, want_k = reference(positions, q.double(), k.double())
    got_q, got_k = NativeRotaryEmbedding(rotary, kernels)(positions, q, k)
    assert got_q.data_ptr() == q.data_ptr()  # in place, in the projection's output
    assert (got_q.double() - want_q).abs().max().item() <= 1e-5
    assert (got_k.double() - want_k).abs().max().item() <= 1e-5


def test_the_swap_keeps_a_shared_rotary_table_shared(kernels):
    rope = RotaryEmbedding(32, 64, RopeConfig(theta=10000.0), torch.float32)
    layers = torch.nn.ModuleList(torch.nn.ModuleDict({"rotary": rope, "norm": RMSNorm(16, 1e-5), "mlp": GatedMLP(16, 24, False)})
                                 for _ in range(3))
    assert fuse_elementwise(layers, kernels) == 1 + 3 + 3
    assert len({id(layer["rotary"]) for layer in layers}) == 1 and isinstance(layers[0]["rotary"], NativeRotaryEmbedding)
    assert all(isinstance(layer["norm"], NativeRMSNorm) for layer in layers)
    x = torch.randn(5, 16)
    mlp = layers[0]["mlp"]
    want = mlp.down_proj(silu_and_mul(mlp.gate_up_proj(x)))
    assert (mlp(x) - want).abs().max().item() <= 1e-5
