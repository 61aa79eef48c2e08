"""The Llama family of decoders: Llama, Mistral (sliding window), Qwen2 (qkv bias), Qwen3 (q/k norm).

They differ only in flags read from ``config.json`` (see ``ModelConfig``), so one module
serves all four. Attention goes through the engine's ``AttentionBackend`` over the paged KV cache.
"""

from __future__ import annotations

import torch
from torch import nn

from kvtier.attention.backend import AttentionBackend
from kvtier.attention.metadata import AttentionMetadata
from kvtier.cache.layer_cache import LayerCache
from kvtier.models.causal_lm import CausalLM
from kvtier.models.config import ModelConfig
from kvtier.models.layers import GatedMLP, RMSNorm
from kvtier.models.rope import RotaryEmbedding


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding | None, backend: AttentionBackend) -> None:
        """``rotary``: None for attention without positional encoding (NemotronH's)."""
        super().__init__()
        self.backend = backend
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.rotary = rotary
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=cfg.attention_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm

    def shard_sizes(self) -> list[int]:
        return [self.q_size, self.kv_size, self.kv_size]

    def forward(self, x: torch.Tensor, positions: torch.Tensor, kv: LayerCache, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split(self.shard_sizes(), dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rotary is not None:
            q, k = self.rotary(positions, q, k)
        out = self.backend.forward(q, k, v, kv, meta, self.scale)
        return self.o_proj(out.reshape(-1, self.q_size))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, backend: AttentionBackend) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, rotary, backend)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, kv: LayerCache, meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), positions, kv, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(CausalLM):
    """Decoder-only transformer over a flattened batch of tokens [T]."""

    def __init__(self, cfg: ModelConfig, max_positions: int, backend: AttentionBackend) -> None:
        super().__init__()
        self.config = cfg
        rotary = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope, cfg.dtype)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, rotary, backend) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.add_lm_head(cfg, self.embed_tokens)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                metas: list[AttentionMetadata]) -> torch.Tensor:
        """Hidden states [T, hidden] after the final norm; each layer reads its cache with its layer group's metadata
        (a sliding-window layer's metadata carries its window)."""
        x = self.embed_tokens(input_ids)
        for layer, kv, meta in zip(self.layers, kv_caches, metas):
            x = layer(x, positions, kv, meta)
        return self.norm(x)
