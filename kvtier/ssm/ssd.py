"""Mamba2's selective state space in PyTorch: the chunked SSD scan for prefill, the one-step recurrence for decode.

Dao & Gu (Transformers are SSMs, 2024) write the Mamba2 layer as a recurrence over a state h [H, P, N] per sequence:
``h_t = exp(dt_t * A) * h_{t-1} + dt_t * x_t (outer) B_t`` and ``y_t = h_t . C_t + D * x_t``. Prefill evaluates it
chunk by chunk (state-space duality): inside a chunk as a masked, attention-like product; between chunks by
carrying the state. Both forms here give the same numbers as HF transformers' torch path (``mamba2_chunk_scan`` and
``selective_state_update`` of modeling_bamba), in float32 whatever the model's dtype. A chunk may be partial and a
scan may start from any state, so a prefill can stop at any token and resume there exactly.

Shapes, one leading batch dim b: x [b, L, H, P]; dt [b, L, H] (after softplus and clamping); A [H] (negative);
B, C [b, L, G, N] with H divisible by G; states [b, H, P, N]. The causal convolution keeps the last K-1 inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def segment_sums(a: torch.Tensor) -> torch.Tensor:
    """[..., l] -> [..., l, l]: out[i, j] = a[j+1] + ... + a[i] for i >= j, -inf above the diagonal.

    Summed with masks instead of differencing cumulative sums, so a long chunk of strongly decaying
    heads loses no precision to cancellation."""
    length = a.shape[-1]
    below = torch.ones(length, length, dtype=torch.bool, device=a.device).tril(-1)
    terms = a[..., :, None].expand(*a.shape, length).masked_fill(~below, 0.0)  # terms[i, j] = a[i] where i > j
    sums = terms.cumsum(dim=-2)
    return sums.masked_fill(~below.logical_or(torch.eye(length, dtype=torch.bool, device=a.device)), float("-inf"))


def _per_head(t: torch.Tensor, heads: int) -> torch.Tensor:
    """B or C [..., G, N] -> [..., H, N]: each group serves H / G consecutive heads."""
    return t.repeat_interleave(heads // t.shape[-2], dim=-2)


def chunk_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: torch.Tensor,
               chunk_size: int, initial_state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """y [b, L, H, P] and the state after the last token [b, H, P, N], both float32.

    Whole chunks of ``chunk_size`` tokens, then one partial chunk of the rest, scanned on from the whole chunks'
    state rather than padded: padding a short prefill to a whole chunk would multiply its quadratic part by
    (chunk_size / L)^2."""
    length = x.shape[1]
    whole = length // chunk_size * chunk_size
    if 0 < whole < length:
        head, state = _scan(x[:, :whole], dt[:, :whole], A, B[:, :whole], C[:, :whole], D, chunk_size, initial_state)
        tail, state = _scan(x[:, whole:], dt[:, whole:], A, B[:, whole:], C[:, whole:], D, length - whole, state)
        return torch.cat([head, tail], dim=1), state
    return _scan(x, dt, A, B, C, D, min(chunk_size, length), initial_state)


def _scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: torch.Tensor,
          chunk_size: int, initial_state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`chunk_scan` over a length that is a multiple of ``chunk_size``."""
    b, length, heads, head_dim = x.shape
    x, dt, A = x.float(), dt.float(), A.float()
    B, C = _per_head(B.float(), heads), _per_head(C.float(), heads)
    skip = D.float()[:, None] * x

    def chunks(t: torch.Tensor) -> torch.Tensor:  # [b, L, ...] -> [b, c, l, ...]
        return t.reshape(b, -1, chunk_size, *t.shape[2:])

    xdt = chunks(x * dt[..., None])  # [b, c, l, H, P]
    decay = chunks(dt * A).permute(0, 3, 1, 2)  # [b, H, c, l]: log of each step's decay
    B, C = chunks(B), chunks(C)  # [b, c, l, H, N]
    cum = decay.cumsum(dim=-1)

    # inside each chunk: y_l = sum_{s <= l} (C_l . B_s) exp(decay s+1..l) xdt_s
    mix = torch.einsum("bclhn,bcshn->bhcls", C, B) * torch.exp(segment_sums(decay))
    y = torch.einsum("bhcls,bcshp->bclhp", mix, xdt)

    # each chunk's own contribution to the state at its end, then the state entering every chunk
    to_end = torch.exp(cum[..., -1:] - cum)  # [b, H, c, l]
    own = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, to_end, xdt)
    start = initial_state.float() if initial_state is not None else torch.zeros_like(own[:, 0])
    carried = torch.exp(segment_sums(F.pad(cum[..., -1], (1, 0))))  # [b, H, c+1, c+1]: decay from chunk j's end to chunk i's
    states = torch.einsum("bhij,bjhpn->bihpn", carried, torch.cat([start[:, None], own], dim=1))
    entering, final = states[:, :-1], states[:, -1]

    y = y + torch.einsum("bclhn,bchpn,bhcl->bclhp", C, entering, torch.exp(cum))
    return y.reshape(b, length, heads, head_dim) + skip, final


# State bytes one pass of state_step gathers: small enough that its four operations run in cache
_STEP_BYTES = 1 << 21


def state_step(states: torch.Tensor, slots: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
               C: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """One token for each of b sequences: x [b, H, P], dt [b, H], B, C [b, G, N]; the sequences' states are rows
    ``slots`` [b] of ``states`` [S, H, P, N], updated in place (computed in float32). Returns y [b, H, P], float32.

    Goes through the slots a few at a time (about 2 MiB of state a pass), so each pass gathers, updates, reads and
    scatters its states while they are in cache; one pass over a whole batch of large states (64 sequences of
    Bamba's 512 KiB) spends its time in page faults and memory traffic. y = h . C is computed as C^T h^T, the
    faster of the two ``bmm`` shapes on CPU."""
    b, heads, head_dim = x.shape
    size = states.shape[-1]
    x, dt = x.float(), dt.float()
    decay = torch.exp(dt * A.float())[..., None, None]  # [b, H, 1, 1]
    xdt = (dt[..., None] * x).reshape(b, heads * head_dim, 1)
    B = _per_head(B.float(), heads).reshape(b, heads, 1, size)
    C = _per_head(C.float(), heads).reshape(b, heads, 1, size)
    y = torch.empty(b, heads, 1, head_dim, device=x.device)
    per_pass = max(1, _STEP_BYTES // (states[0].numel() * 4))
    for i in range(0, b, per_pass):
        rows, index = slice(i, i + per_pass), slots[i : i + per_pass]
        h = states.index_select(0, index).float()
        h.mul_(decay[rows])
        flat = h.view(-1, head_dim, size)
        flat.baddbmm_(xdt[rows].view(-1, head_dim, 1), B[rows].view(-1, 1, size))
        torch.bmm(C[rows].view(-1, 1, size), flat.transpose(1, 2), out=y[rows].view(-1, 1, head_dim))
        states.index_copy_(0, index, h.to(states.dtype))
    return y[:, :, 0] + D.float()[:, None] * x


def causal_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal conv1d and SiLU over one sequence's new inputs x [b, L, channels], continuing from
    ``state`` [b, channels, K-1] (the inputs before them; zeros at a sequence's start). Returns the outputs
    [b, L, channels] and the new state (the last K-1 inputs)."""
    kernel = weight.shape[-1]
    seq = torch.cat([state.to(x.dtype), x.transpose(1, 2)], dim=-1)  # [b, channels, K-1 + L]
    out = F.conv1d(seq.to(weight.dtype), weight.view(weight.shape[0], 1, kernel), bias, groups=weight.shape[0])
    return F.silu(out).transpose(1, 2).to(x.dtype), seq[..., seq.shape[-1] - (kernel - 1):]
