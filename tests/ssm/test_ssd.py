"""The SSD scan and the one-step recurrence against a float64 token-by-token recurrence written out in the test,
and the property the prefix cache builds on: stopping anywhere and resuming from the state changes nothing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvtier.ssm import ssd
from kvtier.ssm.ssd import causal_conv, chunk_scan, segment_sums, state_step

H, P, G, N = 4, 8, 2, 16


def _inputs(length: int, seed: int = 0, batch: int = 2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, H, P, generator=g)
    dt = F.softplus(torch.randn(batch, length, H, generator=g))
    A = -torch.exp(torch.randn(H, generator=g))
    B, C = torch.randn(batch, length, G, N, generator=g), torch.randn(batch, length, G, N, generator=g)
    D = torch.randn(H, generator=g)
    h0 = torch.randn(batch, H, P, N, generator=g)
    return x, dt, A, B, C, D, h0


def _recurrence(x, dt, A, B, C, D, h0):
    """h_t = exp(dt A) h_{t-1} + dt x_t B_t^T, y_t = h_t C_t + D x_t, in float64, one token at a time."""
    x, dt, A, B, C, D, h = (t.double() for t in (x, dt, A, B, C, D, h0))
    B, C = B.repeat_interleave(H // G, dim=2), C.repeat_interleave(H // G, dim=2)
    ys = []
    for t in range(x.shape[1]):
        h = h * torch.exp(dt[:, t] * A)[..., None, None] + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
        ys.append((h * C[:, t, :, None, :]).sum(-1) + D[:, None] * x[:, t])
    return torch.stack(ys, dim=1), h


@pytest.mark.parametrize("length, chunk", [(1, 8), (8, 8), (21, 8), (64, 16), (50, 64)])
def test_chunk_scan_equals_the_recurrence_for_full_and_partial_chunks(length, chunk):
    x, dt, A, B, C, D, h0 = _inputs(length)
    y, h = chunk_scan(x, dt, A, B, C, D, chunk, h0)
    y_ref, h_ref = _recurrence(x, dt, A, B, C, D, h0)
    assert torch.allclose(y.double(), y_ref, atol=1e-4, rtol=1e-4)
    assert torch.allclose(h.double(), h_ref, atol=1e-4, rtol=1e-4)


def test_the_one_step_recurrence_equals_the_reference():
    x, dt, A, B, C, D, h0 = _inputs(1, seed=3)
    y_ref, h_ref = _recurrence(x, dt, A, B, C, D, h0)
    h = h0.clone()
    y = state_step(h, torch.arange(h.shape[0]), x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D)
    assert torch.allclose(y.double(), y_ref[:, 0], atol=1e-5) and torch.allclose(h.double(), h_ref, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_step_updates_only_its_slots_of_a_pool_pass_by_pass(monkeypatch, dtype):
    """Five sequences in scattered slots of an eight-slot pool, two slots a pass: each slot holds its sequence's
    next state (to within one unit in the last place of the pool's dtype), the other slots are untouched."""
    monkeypatch.setattr(ssd, "_STEP_BYTES", 2 * H * P * N * 4)
    x, dt, A, B, C, D, h0 = _inputs(1, seed=5, batch=5)
    y_ref, h_ref = _recurrence(x, dt, A, B, C, D, h0.to(dtype).float())
    pool = torch.randn(8, H, P, N).to(dtype)
    slots = torch.tensor([6, 1, 3, 7, 0])
    pool[slots] = h0.to(dtype)
    before = pool.clone()
    y = state_step(pool, slots, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D)
    assert torch.allclose(y.double(), y_ref[:, 0], atol=1e-5)
    ulp = torch.finfo(dtype).eps  # one unit in the last place of the pool's dtype, relative
    assert torch.allclose(pool[slots].double(), h_ref, rtol=ulp, atol=1e-5)
    untouched = torch.tensor([2, 4, 5])
    assert torch.equal(pool[untouched], before[untouched])


@pytest.mark.parametrize("stop", [5, 16, 17, 31])
def test_a_scan_stopped_anywhere_and_resumed_from_its_state_equals_one_scan(stop):
    x, dt, A, B, C, D, _ = _inputs(48, seed=1)
    whole, h_whole = chunk_scan(x, dt, A, B, C, D, 16)
    head, h = chunk_scan(x[:, :stop], dt[:, :stop], A, B[:, :stop], C[:, :stop], D, 16)
    tail, h_end = chunk_scan(x[:, stop:], dt[:, stop:], A, B[:, stop:], C[:, stop:], D, 16, h)
    assert torch.allclose(torch.cat([head, tail], dim=1), whole, atol=1e-5)
    assert torch.allclose(h_end, h_whole, atol=1e-5)
    step = state_step(h, torch.arange(h.shape[0]), x[:, stop], dt[:, stop], A, B[:, stop], C[:, stop], D)
    assert torch.allclose(step, whole[:, stop], atol=1e-5), "a decode step continues a prefill's state"


def test_segment_sums_hand_worked():
    s = segment_sums(torch.tensor([1.0, 2.0, 4.0]))
    inf = float("-inf")
    assert s.tolist() == [[0.0, inf, inf], [2.0, 0.0, inf], [6.0, 4.0, 0.0]]


def test_causal_conv_in_pieces_equals_one_padded_convolution():
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(1, 13, 6, generator=g), torch.randn(6, 1, 4, generator=g), torch.randn(6, generator=g)
    whole = F.silu(F.conv1d(x.transpose(1, 2), w, b, padding=3, groups=6)[..., :13]).transpose(1, 2)
    state = torch.zeros(1, 6, 3)
    pieces = []
    for a, z in [(0, 2), (2, 3), (3, 11), (11, 13)]:
        out, state = causal_conv(x[:, a:z], w, b, state)
        pieces.append(out)
    assert torch.allclose(torch.cat(pieces, dim=1), whole, atol=1e-6)
    assert torch.equal(state, x[:, -3:].transpose(1, 2)), "the state is the last K-1 inputs"
