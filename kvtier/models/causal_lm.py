"""What every decoder shares: an LM head (tied to the token embedding when the config says so), logits from
hidden states, and filling its parameters from HF-named checkpoint tensors."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from kvtier.models.config import ModelConfig
from kvtier.models.weights import load_hf_weights


class CausalLM(nn.Module):
    config: ModelConfig

    def add_lm_head(self, cfg: ModelConfig, embedding: nn.Embedding) -> None:
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = embedding.weight

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors in, fusing q/k/v and gate/up; every parameter must be filled once."""
        load_hf_weights(self, weights, self.config.tie_word_embeddings)
