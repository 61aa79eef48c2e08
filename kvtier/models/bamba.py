"""Bamba (IBM's hybrid): Mamba2 layers with a few attention layers among them, each followed by a gated MLP.

HF transformers' BambaForCausalLM: a layer is ``x + mixer(input_layernorm(x))`` then ``x + feed_forward(pre_ff_layernorm(x))``,
the mixer being the Llama attention (through the engine's backend, over the paged KV cache) or the Mamba2 mixer
(over the state pool). The runner hands every layer its own pair of cache tensors and its group's metadata,
so the model does not know which group is which beyond its own layer kinds.
"""

from __future__ import annotations

import torch
from torch import nn

from kvtier.attention.backend import AttentionBackend
from kvtier.models.causal_lm import CausalLM
from kvtier.models.config import ModelConfig
from kvtier.models.layers import GatedMLP, RMSNorm
from kvtier.models.llama import Attention
from kvtier.models.mamba2 import Mamba2Mixer
from kvtier.models.rope import RotaryEmbedding


class HybridLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, mixer: nn.Module, name: str) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.add_module(name, mixer)  # HF's name: "mamba" or "self_attn"
        self.mixer = name
        self.pre_ff_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.feed_forward = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor], meta: object) -> torch.Tensor:
        h = self.input_layernorm(x)
        if self.mixer == "mamba":
            x = x + self.mamba(h, cache[0], cache[1], meta)
        else:
            x = x + self.self_attn(h, positions, cache, meta)
        return x + self.feed_forward(self.pre_ff_layernorm(x))


class BambaForCausalLM(CausalLM):
    """Hybrid decoder over a flattened batch of tokens [T]."""

    def __init__(self, cfg: ModelConfig, max_positions: int, backend: AttentionBackend) -> None:
        super().__init__()
        self.config = cfg
        rotary = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope, cfg.dtype)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(HybridLayer(cfg, Mamba2Mixer(cfg.mamba), "mamba") if i in cfg.mamba_layers
                                    else HybridLayer(cfg, Attention(cfg, rotary, backend), "self_attn")
                                    for i in range(cfg.num_hidden_layers))
        self.final_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.add_lm_head(cfg, self.embed_tokens)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, caches: list[tuple[torch.Tensor, torch.Tensor]], metas: list[object]) -> torch.Tensor:
        """Hidden states [T, hidden] after the final norm; each layer reads its own cache with its group's metadata."""
        x = self.embed_tokens(input_ids)
        for layer, cache, meta in zip(self.layers, caches, metas):
            x = layer(x, positions, cache, meta)
        return self.final_layernorm(x)
