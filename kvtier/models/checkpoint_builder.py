"""Write a random-weight Llama checkpoint as an HF folder, with our own code.

Used by the README's main command until a trained model ships, and by the throughput
benchmark's reference model. The tokenizer is a byte-level BPE trained on a fixed list of the
running interpreter's standard-library sources, so it is the same on every machine with that Python.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, processors, trainers

from kvtier.errors import InvalidArgumentError
from kvtier.models.config import parse_dtype

CORPUS_MODULES = sorted([
    "argparse", "ast", "collections", "contextlib", "dataclasses", "enum", "functools", "heapq", "inspect", "json",
    "logging", "pathlib", "random", "re", "shutil", "string", "textwrap", "threading", "typing", "unittest",
])
SPECIAL_TOKENS = ["<s>", "</s>", "<pad>"]
CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"


def corpus_text() -> list[str]:
    import importlib

    return [inspect.getsource(importlib.import_module(name)) for name in CORPUS_MODULES]


def train_tokenizer(vocab_size: int) -> HFTokenizer:
    """Byte-level BPE; ids 0, 1, 2 are <s>, </s>, <pad>; <s> is prepended on encode."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus_text(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)])
    return tok


def write_tokenizer(path: Path, vocab_size: int, max_length: int) -> None:
    train_tokenizer(vocab_size).save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
        "add_bos_token": True, "model_max_length": max_length, "chat_template": CHAT_TEMPLATE,
    }, indent=2))


def _positive(**values: int) -> None:
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise InvalidArgumentError(name, f"must be a positive integer, got {v!r}")


def build_random_checkpoint(
    path: str | Path,
    *,
    hidden_size: int = 512,
    num_hidden_layers: int = 8,
    num_attention_heads: int = 8,
    num_key_value_heads: int = 4,
    intermediate_size: int = 1408,
    vocab_size: int = 32000,
    max_position_embeddings: int = 4096,
    tie_word_embeddings: bool = False,
    dtype: str = "float32",
    seed: int = 0,
    tokenizer_vocab_size: int = 4096,
) -> Path:
    """Write config.json, model.safetensors (N(0, 0.02) weights, unit norms) and tokenizer files to ``path``."""
    _positive(hidden_size=hidden_size, num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
              num_key_value_heads=num_key_value_heads, intermediate_size=intermediate_size, vocab_size=vocab_size,
              max_position_embeddings=max_position_embeddings, tokenizer_vocab_size=tokenizer_vocab_size)
    if hidden_size % num_attention_heads:
        raise InvalidArgumentError("num_attention_heads", f"must divide hidden_size ({hidden_size}), got {num_attention_heads}")
    if num_attention_heads % num_key_value_heads:
        raise InvalidArgumentError("num_key_value_heads", f"must divide num_attention_heads ({num_attention_heads}), got {num_key_value_heads}")
    if tokenizer_vocab_size > vocab_size:
        raise InvalidArgumentError("tokenizer_vocab_size", f"must be <= vocab_size ({vocab_size}), got {tokenizer_vocab_size}")
    torch_dtype = parse_dtype(dtype)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    head_dim = hidden_size // num_attention_heads
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden_size, "intermediate_size": intermediate_size,
        "num_hidden_layers": num_hidden_layers, "num_attention_heads": num_attention_heads, "num_key_value_heads": num_key_value_heads,
        "head_dim": head_dim, "vocab_size": vocab_size, "max_position_embeddings": max_position_embeddings, "hidden_act": "silu",
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "attention_bias": False, "mlp_bias": False, "initializer_range": 0.02,
        "tie_word_embeddings": tie_word_embeddings, "use_cache": True, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2,
        "dtype": str(torch_dtype).removeprefix("torch."),
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}, indent=2))
    g = torch.Generator().manual_seed(seed)

    def normal(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.02).to(torch_dtype)

    kv = num_key_value_heads * head_dim
    tensors = {"model.embed_tokens.weight": normal(vocab_size, hidden_size), "model.norm.weight": torch.ones(hidden_size, dtype=torch_dtype)}
    for i in range(num_hidden_layers):
        pre = f"model.layers.{i}."
        tensors |= {
            pre + "self_attn.q_proj.weight": normal(hidden_size, hidden_size),
            pre + "self_attn.k_proj.weight": normal(kv, hidden_size),
            pre + "self_attn.v_proj.weight": normal(kv, hidden_size),
            pre + "self_attn.o_proj.weight": normal(hidden_size, hidden_size),
            pre + "mlp.gate_proj.weight": normal(intermediate_size, hidden_size),
            pre + "mlp.up_proj.weight": normal(intermediate_size, hidden_size),
            pre + "mlp.down_proj.weight": normal(hidden_size, intermediate_size),
            pre + "input_layernorm.weight": torch.ones(hidden_size, dtype=torch_dtype),
            pre + "post_attention_layernorm.weight": torch.ones(hidden_size, dtype=torch_dtype),
        }
    if not tie_word_embeddings:
        tensors["lm_head.weight"] = normal(vocab_size, hidden_size)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    write_tokenizer(path, tokenizer_vocab_size, max_position_embeddings)
    return path
