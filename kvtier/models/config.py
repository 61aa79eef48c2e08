"""The subset of an HF ``config.json`` that kvtier's decoders need, parsed once.

Reads both the transformers-4 keys (``rope_theta``, ``rope_scaling``) and the
transformers-5 key (``rope_parameters``), so checkpoints saved by either load.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvtier.errors import InvalidArgumentError, ModelNotFoundError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str | torch.dtype, field_name: str = "dtype") -> torch.dtype:
    """Map a user or config dtype name to a torch dtype (fp32 / bf16 / fp16)."""
    if isinstance(name, torch.dtype):
        if name in _DTYPES.values():
            return name
        raise InvalidArgumentError(field_name, f"must be one of {sorted(_DTYPES)}, got {name}")
    aliases = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
    key = aliases.get(str(name), str(name))
    if key not in _DTYPES:
        raise InvalidArgumentError(field_name, f"must be one of {sorted(_DTYPES)} or 'auto', got {name!r}")
    return _DTYPES[key]


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None
    partial_rotary_factor: float = 1.0  # the leading fraction of each head's dimensions that rotates (Bamba, NemotronH)


@dataclass(frozen=True)
class Mamba2Config:
    """A Mamba2 mixer's shape, read from any hybrid family's config.json keys."""

    hidden_size: int
    num_heads: int
    head_dim: int
    n_groups: int
    state_size: int
    conv_kernel: int
    chunk_size: int
    conv_bias: bool
    proj_bias: bool
    norm_eps: float
    time_step_limit: tuple[float, float] = (0.0, math.inf)

    @property
    def inner_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def conv_dim(self) -> int:
        return self.inner_size + 2 * self.n_groups * self.state_size

    @classmethod
    def from_bamba(cls, raw: dict[str, Any]) -> Mamba2Config:
        """The mixer of a Bamba ``config.json``, whose inner size is ``mamba_expand * hidden_size``."""
        cfg = cls(hidden_size=raw["hidden_size"], num_heads=raw["mamba_n_heads"], head_dim=raw["mamba_d_head"],
                  n_groups=raw.get("mamba_n_groups", 1), state_size=raw["mamba_d_state"], conv_kernel=raw.get("mamba_d_conv", 4),
                  chunk_size=raw.get("mamba_chunk_size", 256), conv_bias=bool(raw.get("mamba_conv_bias", True)),
                  proj_bias=bool(raw.get("mamba_proj_bias", False)), norm_eps=raw.get("rms_norm_eps", 1e-6),
                  time_step_limit=parse_time_step_limit(raw.get("time_step_limit")))
        expand = raw.get("mamba_expand", 2)
        if cfg.inner_size != expand * cfg.hidden_size:
            raise InvalidArgumentError("config.mamba_d_head", f"mamba_n_heads x mamba_d_head must equal mamba_expand x hidden_size "
                                       f"({expand * cfg.hidden_size}), got {cfg.num_heads} x {cfg.head_dim}")
        return cfg


    @classmethod
    def from_nemotron_h(cls, raw: dict[str, Any]) -> Mamba2Config:
        """The mixer of a NemotronH ``config.json``. Like transformers, its dt clamp is ``(time_step_min, inf)``,
        whatever ``time_step_limit`` says."""
        return cls(hidden_size=raw["hidden_size"], num_heads=raw["mamba_num_heads"], head_dim=raw["mamba_head_dim"],
                   n_groups=raw.get("n_groups", 8), state_size=raw.get("ssm_state_size", 128), conv_kernel=raw.get("conv_kernel", 4),
                   chunk_size=raw.get("chunk_size", 128), conv_bias=bool(raw.get("use_conv_bias", True)),
                   proj_bias=bool(raw.get("use_bias", False)), norm_eps=raw.get("layer_norm_epsilon", 1e-5),
                   time_step_limit=(float(raw.get("time_step_min", 0.001)), math.inf))


def parse_time_step_limit(value: Any) -> tuple[float, float]:
    """``time_step_limit`` as config.json writes it: absent, or two bounds, each a number, "Infinity" or
    transformers' ``{"__float__": "Infinity"}``."""
    if value is None:
        return (0.0, math.inf)

    def bound(v: Any) -> float:
        return float(v["__float__"] if isinstance(v, dict) else v)

    try:
        low, high = (bound(v) for v in value)
    except (TypeError, ValueError, KeyError):
        raise InvalidArgumentError("config.time_step_limit", f"must be two bounds (numbers or Infinity), got {value!r}") from None
    if not 0.0 <= low <= high:
        raise InvalidArgumentError("config.time_step_limit", f"must satisfy 0 <= low <= high, got {value!r}")
    return (low, high)


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope: RopeConfig | None  # None: no positional encoding (NemotronH's attention layers)
    tie_word_embeddings: bool
    attention_bias: bool
    qkv_bias: bool
    mlp_bias: bool
    qk_norm: bool
    sliding_windows: tuple[int | None, ...]
    dtype: torch.dtype
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    mamba: Mamba2Config | None = None  # the Mamba2 mixer of a hybrid's SSM layers
    mamba_layers: tuple[int, ...] = ()  # which layers are Mamba2
    mlp_layers: tuple[int, ...] = ()  # layers with an MLP alone, no cache (NemotronH's "-" blocks); the rest attend
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V that one token occupies across the attention layers."""
        elem = torch.tensor([], dtype=self.dtype).element_size()
        return 2 * len(self.attention_layers) * self.num_key_value_heads * self.head_dim * elem

    @property
    def attention_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_hidden_layers) if i not in self.mamba_layers and i not in self.mlp_layers)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise ModelNotFoundError(f"model: no config.json in {path} (a model is an HF checkpoint folder)")
        raw = json.loads(cfg_file.read_text())
        archs = raw.get("architectures") or []
        if not archs:
            raise InvalidArgumentError("model", f"{cfg_file} names no 'architectures'")
        heads = raw["num_attention_heads"]
        hidden = raw["hidden_size"]
        model_type = raw.get("model_type", "")
        kinds = _nemotron_h_kinds(raw) if model_type == "nemotron_h" else None
        layers = len(kinds) if kinds else raw["num_hidden_layers"]
        return cls(
            architecture=archs[0],
            model_type=model_type,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or hidden // heads,
            intermediate_size=raw["intermediate_size"],
            vocab_size=raw["vocab_size"],
            max_position_embeddings=raw.get("max_position_embeddings", 2048),
            rms_norm_eps=raw.get("rms_norm_eps", raw.get("layer_norm_epsilon", 1e-6)),
            rope=None if model_type == "nemotron_h" else _parse_rope(raw),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=bool(raw.get("attention_bias", False)),
            qkv_bias=model_type == "qwen2" or bool(raw.get("attention_bias", False)),
            mlp_bias=bool(raw.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            sliding_windows=_parse_sliding_windows(raw, model_type, layers),
            dtype=parse_dtype(raw.get("dtype") or raw.get("torch_dtype") or "float32", "config.dtype"),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=_as_tuple(raw.get("eos_token_id")),
            **_parse_hybrid(raw, model_type, layers, kinds),
            raw=raw,
        )


def _parse_hybrid(raw: dict[str, Any], model_type: str, layers: int, kinds: tuple[str, ...] | None) -> dict[str, Any]:
    """The Mamba2 mixer and its layers, for the hybrid families kvtier runs; nothing for a pure transformer."""
    if model_type == "nemotron_h" and kinds:
        return {"mamba": Mamba2Config.from_nemotron_h(raw), "mamba_layers": tuple(i for i, k in enumerate(kinds) if k == "linear_attention"),
                "mlp_layers": tuple(i for i, k in enumerate(kinds) if k == "mlp")}
    if model_type != "bamba":
        return {}
    attention = set(raw.get("attn_layer_indices") or ())
    return {"mamba": Mamba2Config.from_bamba(raw), "mamba_layers": tuple(i for i in range(layers) if i not in attention)}


_NEMOTRON_H_PATTERN = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}


def _nemotron_h_kinds(raw: dict[str, Any]) -> tuple[str, ...]:
    """NemotronH's block kinds, from ``layers_block_type`` (transformers 5) or ``hybrid_override_pattern`` ("M*-M...")."""
    kinds = raw.get("layers_block_type")
    if kinds is None:
        pattern = raw.get("hybrid_override_pattern") or ""
        if set(pattern) - set(_NEMOTRON_H_PATTERN):
            raise InvalidArgumentError("config.hybrid_override_pattern", f"must use only {''.join(_NEMOTRON_H_PATTERN)}, got {pattern!r}")
        kinds = [_NEMOTRON_H_PATTERN[c] for c in pattern]
    if not kinds:
        raise InvalidArgumentError("config.layers_block_type", "a NemotronH config must list its blocks (or give hybrid_override_pattern)")
    supported = ("linear_attention", "full_attention", "mlp")
    bad = sorted(set(kinds) - set(supported))
    if bad:
        raise InvalidArgumentError("config.layers_block_type", f"kvtier runs NemotronH blocks of kinds {list(supported)}; "
                                   f"this model has {bad} (mixture-of-experts blocks are not supported yet)")
    return tuple(kinds)


def _as_tuple(value: int | list[int] | None) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list) else (value,)


def _parse_rope(raw: dict[str, Any]) -> RopeConfig:
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", "linear", "llama3"):
        raise InvalidArgumentError("rope_scaling", f"rope_type {rope_type!r} is not supported; kvtier supports default, linear, llama3")
    return RopeConfig(
        theta=float(theta),
        rope_type=rope_type,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=params.get("original_max_position_embeddings"),
        partial_rotary_factor=float(params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))),
    )


def _parse_sliding_windows(raw: dict[str, Any], model_type: str, layers: int) -> tuple[int | None, ...]:
    """Per-layer window (None = full attention), following each architecture's config rules."""
    window = raw.get("sliding_window")
    if model_type in ("qwen2", "qwen3") and not raw.get("use_sliding_window", False):
        window = None
    layer_types = raw.get("layer_types")
    if window and layer_types:
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    return tuple([window or None] * layers)
