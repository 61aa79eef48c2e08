"""Write a random-weight Llama-family checkpoint as an HF folder, with our own code.

Used by the README's main command until a trained model ships, and by the throughput benchmark's
reference model. The folder is a normal HF checkpoint (``config.json``, ``model.safetensors``,
``tokenizer.json``, ``tokenizer_config.json``, ``generation_config.json``), so transformers loads it
too, which is what makes it usable as a parity reference.

The tokenizer is a byte-level BPE trained on a fixed list of the running interpreter's standard-library
sources: no download, and the same tokenizer on every machine with the same Python version.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer as HFTokenizer

from kvtier.errors import InvalidArgumentError
from kvtier.models.config import parse_dtype
from kvtier.training.bpe import BOS_ID, EOS_ID, MIN_VOCAB, PAD_ID, tokenizer_config, train_bpe

# Modules whose source text trains the tokenizer. Sorted so the corpus order never depends on the list's edit history.
CORPUS_MODULES: tuple[str, ...] = tuple(sorted((
    "argparse", "ast", "collections", "contextlib", "dataclasses", "enum", "functools", "heapq", "inspect", "json",
    "logging", "pathlib", "random", "re", "shutil", "string", "textwrap", "threading", "typing", "unittest",
)))
INIT_STD = 0.02

# Per architecture: config.json's model_type and the keys that transformers' config class adds for it.
# Both share the Llama tensor layout (no biases), so the weights are written the same way.
_ARCHITECTURES: dict[str, tuple[str, dict[str, Any]]] = {
    "LlamaForCausalLM": ("llama", {"attention_bias": False, "mlp_bias": False, "pretraining_tp": 1}),
    "MistralForCausalLM": ("mistral", {"sliding_window": None}),
}


def corpus_texts() -> list[str]:
    """The tokenizer's training text: each corpus module's source file, read without importing it."""
    texts = []
    for name in CORPUS_MODULES:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise RuntimeError(f"standard-library module {name!r} has no source file in this interpreter")
        texts.append(Path(spec.origin).read_text(encoding="utf-8"))
    return texts


def train_tokenizer(vocab_size: int) -> HFTokenizer:
    """The BPE of :mod:`kvtier.training.bpe`, trained on :func:`corpus_texts`."""
    return train_bpe(corpus_texts(), vocab_size)


def _check_positive_ints(**values: object) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidArgumentError(name, f"must be a positive integer, got {value!r}")


def _validate(
    architecture: str, hidden_size: int, num_hidden_layers: int, num_attention_heads: int, num_key_value_heads: int,
    intermediate_size: int, vocab_size: int, max_position_embeddings: int, tie_word_embeddings: bool, seed: int,
    tokenizer_vocab_size: int,
) -> None:
    if architecture not in _ARCHITECTURES:
        raise InvalidArgumentError("architecture", f"must be one of {sorted(_ARCHITECTURES)}, got {architecture!r}")
    _check_positive_ints(
        hidden_size=hidden_size, num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads, intermediate_size=intermediate_size, vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings, tokenizer_vocab_size=tokenizer_vocab_size,
    )
    if hidden_size % num_attention_heads:
        raise InvalidArgumentError("num_attention_heads", f"must divide hidden_size ({hidden_size}), got {num_attention_heads}")
    if num_attention_heads % num_key_value_heads:
        raise InvalidArgumentError("num_key_value_heads", f"must divide num_attention_heads ({num_attention_heads}), got {num_key_value_heads}")
    if not isinstance(tie_word_embeddings, bool):
        raise InvalidArgumentError("tie_word_embeddings", f"must be a bool, got {tie_word_embeddings!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InvalidArgumentError("seed", f"must be a non-negative integer, got {seed!r}")
    if tokenizer_vocab_size < MIN_VOCAB:
        raise InvalidArgumentError("tokenizer_vocab_size", f"must be >= {MIN_VOCAB} (256 bytes + special tokens), got {tokenizer_vocab_size}")
    if tokenizer_vocab_size > vocab_size:
        raise InvalidArgumentError(
            "tokenizer_vocab_size", f"must be <= vocab_size ({vocab_size}) so every token id has an embedding row, got {tokenizer_vocab_size}"
        )


def _random_weights(
    hidden_size: int, num_hidden_layers: int, kv_size: int, intermediate_size: int, vocab_size: int,
    tie_word_embeddings: bool, dtype: torch.dtype, seed: int,
) -> dict[str, torch.Tensor]:
    """HF-named tensors: N(0, 0.02) matrices drawn in a fixed order from one seeded generator, unit norm weights."""
    gen = torch.Generator().manual_seed(seed)

    def normal(rows: int, cols: int) -> torch.Tensor:
        return torch.empty(rows, cols).normal_(0.0, INIT_STD, generator=gen).to(dtype)

    def ones() -> torch.Tensor:
        return torch.ones(hidden_size, dtype=dtype)

    tensors = {"model.embed_tokens.weight": normal(vocab_size, hidden_size)}
    for i in range(num_hidden_layers):
        p = f"model.layers.{i}."
        tensors[p + "self_attn.q_proj.weight"] = normal(hidden_size, hidden_size)
        tensors[p + "self_attn.k_proj.weight"] = normal(kv_size, hidden_size)
        tensors[p + "self_attn.v_proj.weight"] = normal(kv_size, hidden_size)
        tensors[p + "self_attn.o_proj.weight"] = normal(hidden_size, hidden_size)
        tensors[p + "mlp.gate_proj.weight"] = normal(intermediate_size, hidden_size)
        tensors[p + "mlp.up_proj.weight"] = normal(intermediate_size, hidden_size)
        tensors[p + "mlp.down_proj.weight"] = normal(hidden_size, intermediate_size)
        tensors[p + "input_layernorm.weight"] = ones()
        tensors[p + "post_attention_layernorm.weight"] = ones()
    tensors["model.norm.weight"] = ones()
    if not tie_word_embeddings:
        tensors["lm_head.weight"] = normal(vocab_size, hidden_size)
    return tensors


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def build_random_checkpoint(
    path: str | Path,
    *,
    architecture: str = "LlamaForCausalLM",
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
    sliding_window: int = 0,
) -> Path:
    """Write a complete random-weight HF checkpoint folder at ``path`` (created if needed) and return it.

    ``architecture`` is ``LlamaForCausalLM`` or ``MistralForCausalLM`` (full attention, or a ``sliding_window`` of that
    many tokens in every layer; 0: none). Token ids 0, 1, 2
    are ``<s>`` (bos), ``</s>`` (eos), ``<pad>``. The same arguments and Python version give byte-identical files.
    Raises InvalidArgumentError naming the first bad argument, before anything is written.
    """
    _validate(architecture, hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads, intermediate_size,
              vocab_size, max_position_embeddings, tie_word_embeddings, seed, tokenizer_vocab_size)
    if isinstance(sliding_window, bool) or not isinstance(sliding_window, int) or sliding_window < 0:
        raise InvalidArgumentError("sliding_window", f"must be a non-negative integer (0: full attention), got {sliding_window!r}")
    if sliding_window and architecture != "MistralForCausalLM":
        raise InvalidArgumentError("sliding_window", f"must be 0 for {architecture}; only MistralForCausalLM has a sliding window")
    torch_dtype = parse_dtype(dtype)
    dtype_name = str(torch_dtype).removeprefix("torch.")
    model_type, arch_keys = _ARCHITECTURES[architecture]
    head_dim = hidden_size // num_attention_heads
    rope_theta = 10000.0
    config = {
        "architectures": [architecture],
        "model_type": model_type,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads,
        "head_dim": head_dim,
        "vocab_size": vocab_size,
        "max_position_embeddings": max_position_embeddings,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_theta": rope_theta, "rope_type": "default"},
        "attention_dropout": 0.0,
        "initializer_range": INIT_STD,
        "tie_word_embeddings": tie_word_embeddings,
        "use_cache": True,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
        "dtype": dtype_name,
        # transformers-4 spellings of rope_parameters and dtype, so older readers see the same model
        "rope_theta": rope_theta,
        "torch_dtype": dtype_name,
        **arch_keys,
        **({"sliding_window": sliding_window} if sliding_window else {}),
    }
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    _write_json(path / "config.json", config)
    _write_json(path / "generation_config.json", {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID})
    weights = _random_weights(hidden_size, num_hidden_layers, num_key_value_heads * head_dim, intermediate_size, vocab_size,
                              tie_word_embeddings, torch_dtype, seed)
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    train_tokenizer(tokenizer_vocab_size).save(str(path / "tokenizer.json"))
    _write_json(path / "tokenizer_config.json", tokenizer_config(max_position_embeddings))
    return path
