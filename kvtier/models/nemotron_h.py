"""NemotronH (NVIDIA's hybrid: Nemotron-H, Nemotron Nano 2): a stack of blocks, each ``x + mixer(norm(x))`` with one
mixer: Mamba2, attention without positional encoding, or a squared-ReLU MLP.

HF transformers' NemotronHForCausalLM, dense blocks only (its mixture-of-experts blocks are refused when the config is
read). Only the attention and Mamba2 blocks hold a cache: the runner hands the model one (cache, metadata) pair per
such block, in layer order, and the MLP blocks take none.
"""

from __future__ import annotations

import torch
from torch import nn

from kvtier.attention.backend import AttentionBackend
from kvtier.models.causal_lm import CausalLM
from kvtier.models.config import ModelConfig
from kvtier.models.layers import ReluSquaredMLP, RMSNorm
from kvtier.models.llama import Attention
from kvtier.models.mamba2 import Mamba2Mixer


class NemotronHBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, backend: AttentionBackend) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if layer in cfg.mamba_layers:
            self.kind, self.mixer = "mamba", Mamba2Mixer(cfg.mamba)
        elif layer in cfg.mlp_layers:
            self.kind, self.mixer = "mlp", ReluSquaredMLP(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)
        else:
            self.kind, self.mixer = "attention", Attention(cfg, None, backend)

    @property
    def has_cache(self) -> bool:
        return self.kind != "mlp"

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor] | None, meta: object) -> torch.Tensor:
        h = self.norm(x)
        if self.kind == "mamba":
            return x + self.mixer(h, cache[0], cache[1], meta)
        if self.kind == "attention":
            return x + self.mixer(h, positions, cache, meta)
        return x + self.mixer(h)


class NemotronHForCausalLM(CausalLM):
    """Hybrid decoder over a flattened batch of tokens [T]."""

    def __init__(self, cfg: ModelConfig, max_positions: int, backend: AttentionBackend) -> None:
        super().__init__()
        self.config = cfg
        self.embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(NemotronHBlock(cfg, i, backend) for i in range(cfg.num_hidden_layers))
        self.norm_f = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.add_lm_head(cfg, self.embeddings)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, caches: list[tuple[torch.Tensor, torch.Tensor]], metas: list[object]) -> torch.Tensor:
        """Hidden states [T, hidden] after the final norm; ``caches`` and ``metas`` hold one entry per block with a cache."""
        x = self.embeddings(input_ids)
        cached = iter(zip(caches, metas))
        for block in self.layers:
            cache, meta = next(cached) if block.has_cache else (None, None)
            x = block(x, positions, cache, meta)
        return self.norm_f(x)
