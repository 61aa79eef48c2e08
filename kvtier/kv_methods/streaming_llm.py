"""StreamingLLM (Xiao et al., ICLR 2024): keep the first tokens (attention sinks) and the most recent window.

One-shot after prefill, as kvpress's ``StreamingLLMPress``: of a ``budget``-token cache, ``n_sink`` tokens are the
prompt's first and the rest its last; every layer and head keeps the same positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvtier.errors import InvalidArgumentError
from kvtier.kv_methods.base import KVMethod, KVMethodConfig, PromptCache


@dataclass(frozen=True)
class StreamingLLMConfig(KVMethodConfig):
    n_sink: int = 4  # kvpress's and the paper's default

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.n_sink, bool) or not isinstance(self.n_sink, int) or self.n_sink < 0:
            raise InvalidArgumentError("kv_method_config.n_sink", f"must be an integer >= 0, got {self.n_sink!r}")


class StreamingLLM(KVMethod):
    name = "streamingllm"
    config_class = StreamingLLMConfig
    config: StreamingLLMConfig

    def after_prefill(self, prompt: PromptCache) -> torch.Tensor | None:
        n = prompt.num_tokens
        kept = self.config.kept(n)
        if kept >= n:
            return None
        sink = min(self.config.n_sink, kept)
        positions = torch.cat([torch.arange(sink), torch.arange(n - (kept - sink), n)])
        return positions.expand(prompt.num_layers, prompt.num_kv_heads, kept)
