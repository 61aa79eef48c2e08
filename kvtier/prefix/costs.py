"""What a cached prefix saves and what it holds: the FLOP and byte model Marconi's eviction weighs (Pan et al., MLSys
2025, as its authors' simulator codes it), for a hybrid of attention, Mamba2 and MLP layers.

FLOPs of a layer over L tokens (d = model width, N = SSM state size): attention 8 L d^2 + 4 L^2 d, MLP 16 L d^2,
Mamba2 12 L d^2 + 16 L d N + 10 L d. Bytes: K and V of a token in one attention layer, and one Mamba2 layer's state
(SSM d x N plus a conv state of (2d + 2N) x kernel, expand 2, in the model's dtype). For the paper's 7B hybrid (4
attention, 24 Mamba2, 28 MLP layers, d 4,096, N 128, fp16) a state is 1,116,160 bytes per layer, as much as the K/V
of about 409 tokens across its attention layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvtier.models.config import ModelConfig


@dataclass(frozen=True)
class HybridCosts:
    num_attention: int
    num_ssm: int
    num_mlp: int
    d_model: int
    state_size: int  # N
    kv_bytes_per_token: int  # K and V of one token in every attention layer
    state_bytes: int  # one checkpoint: every Mamba2 layer's SSM and conv state (0 for a model without Mamba2 layers)

    @classmethod
    def paper_7b(cls) -> HybridCosts:
        """The NVIDIA Attention-Mamba2 hybrid "7B" of the paper's evaluation (arXiv 2406.07887), sized as the authors' code
        sizes it: K/V of d_model per token and attention layer, a state of d x N plus a conv state of (2d + 2N) x 4, fp16."""
        d, n, fp16 = 4096, 128, 2
        return cls(num_attention=4, num_ssm=24, num_mlp=28, d_model=d, state_size=n, kv_bytes_per_token=4 * 2 * d * fp16,
                   state_bytes=24 * (d * n * fp16 + (2 * d + 2 * n) * 4 * fp16))

    @classmethod
    def from_model(cls, cfg: ModelConfig, kv_bytes_per_token: int, state_bytes: int) -> HybridCosts:
        """A served model's: its layer counts (every attention and Mamba2 layer of a Bamba block has an MLP too; a
        NemotronH model's MLPs are layers of their own) with the bytes its cache really takes."""
        mlps = len(cfg.mlp_layers) if cfg.mlp_layers else cfg.num_hidden_layers
        return cls(num_attention=len(cfg.attention_layers), num_ssm=len(cfg.mamba_layers), num_mlp=mlps, d_model=cfg.hidden_size,
                   state_size=cfg.mamba.state_size if cfg.mamba else 0, kv_bytes_per_token=kv_bytes_per_token, state_bytes=state_bytes)
    def attention_flops(self, tokens: int) -> float:
        d = self.d_model
        return self.num_attention * (8 * tokens * d * d + 4 * tokens * tokens * d)

    def mlp_flops(self, tokens: int) -> float:
        return self.num_mlp * 16 * tokens * self.d_model**2

    def ssm_flops(self, tokens: int) -> float:
        d = self.d_model
        return self.num_ssm * (12 * tokens * d * d + 16 * tokens * d * self.state_size + 10 * tokens * d)

    def prefill_flops(self, tokens: int) -> float:
        """The FLOPs a prefix hit of ``tokens`` tokens saves."""
        return self.attention_flops(tokens) + self.mlp_flops(tokens) + self.ssm_flops(tokens)

    def marginal_flops(self, parent_tokens: int, tokens: int) -> float:
        """What a node ending at ``tokens`` saves beyond its parent ending at ``parent_tokens``: attention's and the MLP's
        cost over the whole prefix less the parent's (the authors' code subtracts attention's for the MLP too, a slip
        not kept here), and the SSM layers' over the edge alone, since the parent's state carries the rest."""
        return (self.attention_flops(tokens) - self.attention_flops(parent_tokens) + self.mlp_flops(tokens) - self.mlp_flops(parent_tokens)
                + self.ssm_flops(tokens - parent_tokens))
