"""Architectures kvtier implements, keyed by the name in ``config.json``'s ``architectures``."""

from __future__ import annotations

from torch import nn

from kvtier.errors import UnsupportedArchitectureError
from kvtier.models.bamba import BambaForCausalLM
from kvtier.models.llama import LlamaForCausalLM
from kvtier.models.nemotron_h import NemotronHForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
    "BambaForCausalLM": BambaForCausalLM,
    "NemotronHForCausalLM": NemotronHForCausalLM,
}


def model_class(architecture: str) -> type[nn.Module]:
    try:
        return MODEL_REGISTRY[architecture]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"model: architecture {architecture!r} is not supported; supported: {', '.join(sorted(MODEL_REGISTRY))}"
        ) from None
