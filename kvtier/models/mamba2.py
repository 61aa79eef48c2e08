"""The Mamba2 mixer over a flattened batch of tokens, its state in a pool of per-sequence slots.

HF transformers' semantics (BambaMixer and its kin): ``in_proj`` splits into the gate z, xBC and dt; a causal
depthwise conv1d (bias, SiLU) runs over xBC; dt + dt_bias goes through softplus and is clamped to
``time_step_limit``; A = -exp(A_log); the selective scan with the D skip; a gated, group-wise RMSNorm; ``out_proj``.
Parameter names match the checkpoints', so weights load as they are. The scan itself is :mod:`kvtier.ssm.ssd`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvtier.models.config import Mamba2Config
from kvtier.ssm.metadata import MambaMetadata
from kvtier.ssm.ssd import causal_conv, chunk_scan, state_step


class GatedRMSNorm(nn.Module):
    """RMSNorm of ``y * silu(z)`` over groups of channels (Mamba2's norm_before_gate=False), in float32."""

    def __init__(self, dim: int, groups: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.groups = groups
        self.eps = eps

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        h = y.float() * F.silu(z.float())
        g = h.view(*h.shape[:-1], self.groups, -1)
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * g.view(h.shape)


class Mamba2Mixer(nn.Module):
    def __init__(self, cfg: Mamba2Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.in_proj = nn.Linear(cfg.hidden_size, cfg.inner_size + cfg.conv_dim + cfg.num_heads, bias=cfg.proj_bias)
        self.conv1d = nn.Conv1d(cfg.conv_dim, cfg.conv_dim, cfg.conv_kernel, groups=cfg.conv_dim, bias=cfg.conv_bias)
        self.dt_bias = nn.Parameter(torch.ones(cfg.num_heads))
        self.A_log = nn.Parameter(torch.zeros(cfg.num_heads))
        self.D = nn.Parameter(torch.ones(cfg.num_heads))
        self.norm = GatedRMSNorm(cfg.inner_size, cfg.n_groups, cfg.norm_eps)
        self.out_proj = nn.Linear(cfg.inner_size, cfg.hidden_size, bias=cfg.proj_bias)

    def state_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """One slot's conv state (the last K-1 xBC inputs) and SSM state."""
        c = self.cfg
        return (c.conv_dim, c.conv_kernel - 1), (c.num_heads, c.head_dim, c.state_size)

    def forward(self, x: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor, meta: MambaMetadata) -> torch.Tensor:
        """x [T, hidden] -> [T, hidden]; reads and updates the slots ``meta`` names in conv_state [S, conv_dim, K-1]
        and ssm_state [S, H, P, N]."""
        c = self.cfg
        if meta.fresh_slots.numel():
            conv_state[meta.fresh_slots] = 0
            ssm_state[meta.fresh_slots] = 0
        z, xbc, dt = self.in_proj(x).split([c.inner_size, c.conv_dim, c.num_heads], dim=-1)
        dt = F.softplus(dt.float() + self.dt_bias.float()).clamp(*c.time_step_limit)
        A = -torch.exp(self.A_log.float())
        y = torch.empty(x.shape[0], c.inner_size, dtype=torch.float32, device=x.device)
        n = meta.num_decodes
        if n:
            slots = meta.decode_slots
            out, conv_state[slots] = self._conv(xbc[:n, None], conv_state[slots])
            xs, B, C = self._split(out[:, 0])
            y[:n] = state_step(ssm_state, slots, xs, dt[:n], A, B, C, self.D).reshape(n, -1)
        for span in meta.prefills:
            rows = slice(span.start, span.start + span.length)
            out, conv_state[span.slot] = self._conv(xbc[None, rows], conv_state[span.slot, None])
            xs, B, C = self._split(out)
            scan, final = chunk_scan(xs, dt[None, rows], A, B, C, self.D, c.chunk_size, ssm_state[span.slot, None])
            ssm_state[span.slot] = final[0].to(ssm_state.dtype)
            y[rows] = scan[0].reshape(span.length, -1)
        return self.out_proj(self.norm(y, z).to(x.dtype))

    def _conv(self, xbc: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, new = causal_conv(xbc, self.conv1d.weight, self.conv1d.bias, state)
        return out, new.to(state.dtype)

    def _split(self, xbc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """xBC [..., conv_dim] -> x [..., H, P], B and C [..., G, N]."""
        c = self.cfg
        xs, B, C = xbc.split([c.inner_size, c.n_groups * c.state_size, c.n_groups * c.state_size], dim=-1)
        lead = xbc.shape[:-1]
        return xs.reshape(*lead, c.num_heads, c.head_dim), B.reshape(*lead, c.n_groups, -1), C.reshape(*lead, c.n_groups, -1)
