"""Tiny HF checkpoints written by transformers itself: the independent reference for parity tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

# a hybrid: attention at layer 1, Mamba2 elsewhere; 16-token SSD chunks, so prompts and prefill chunks split them
BAMBA = dict(num_hidden_layers=4, attn_layer_indices=[1], mamba_n_heads=4, mamba_d_head=32, mamba_n_groups=2, mamba_d_state=16,
             mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=16)
# NemotronH: one mixer a block (M = Mamba2, * = attention without RoPE, - = squared-ReLU MLP)
NEMOTRON_H = dict(hybrid_override_pattern="M*-M-M", mamba_num_heads=4, mamba_head_dim=32, n_groups=2, ssm_state_size=16, conv_kernel=4,
                  chunk_size=16, head_dim=16)
HYBRIDS = {"BambaForCausalLM": BAMBA, "NemotronHForCausalLM": NEMOTRON_H}
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
            max_position_embeddings=512)


def save_hf_checkpoint(path: Path, tokenizer_files: Path, arch: str, dtype: torch.dtype = torch.float32, seed: int = 0, **overrides) -> Path:
    """Build a random model of ``arch`` with transformers and ``save_pretrained`` it with our tokenizer."""
    import transformers

    cfg_cls = {
        "LlamaForCausalLM": transformers.LlamaConfig,
        "MistralForCausalLM": transformers.MistralConfig,
        "Qwen2ForCausalLM": transformers.Qwen2Config,
        "Qwen3ForCausalLM": transformers.Qwen3Config,
        "BambaForCausalLM": transformers.BambaConfig,
        "NemotronHForCausalLM": transformers.NemotronHConfig,
    }[arch]
    cfg = cfg_cls(**{**TINY, "bos_token_id": 0, "eos_token_id": 1, **overrides})
    cfg.architectures = [arch]
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(cfg).to(dtype)
    with torch.no_grad():  # HF inits norms to 1 and biases to 0; randomise them so they are really tested
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif "bias" in name:
                p.normal_(0, 0.1)
    model.save_pretrained(path)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_files / f, path / f)
    return path
