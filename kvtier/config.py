"""Engine arguments, named as vLLM's CLI flags with underscores, validated on construction."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from kvtier.attention.registry import check_backend_name
from kvtier.cache.prefix_cache import HASH_ALGOS
from kvtier.errors import InvalidArgumentError
from kvtier.kv_methods.registry import build_method, parse_config
from kvtier.models.embedded import DEFAULT_MODEL, resolve_model
from kvtier.prefix.radix_tree import POLICIES

PREFIX_CACHE_POLICIES = ("lru", "hash", *POLICIES)

GiB = 1 << 30


def _require_int(name: str, value: object, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgumentError(name, f"must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        rng = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise InvalidArgumentError(name, f"must be {rng}, got {value}")


@dataclass
class EngineArgs:
    model: str = DEFAULT_MODEL  # an HF checkpoint folder, or the name of a model shipped with kvtier
    tokenizer: str | None = None
    dtype: str = "auto"
    seed: int = 0
    device: str = "auto"
    max_model_len: int | None = None
    block_size: int = 16
    kv_cache_memory: int | None = None  # bytes of KV cache; None: 1 GiB on CPU, from gpu_memory_utilization on GPU
    kv_host_memory: int | None = None  # bytes of the host tier (V under --kv-method kcache); None: V for every device block
    gpu_memory_utilization: float = 0.9  # fraction of GPU memory for weights + activations + KV cache
    swap_space: float = 4.0  # GiB of host memory for swapped-out blocks
    enable_prefix_caching: bool | None = None  # None: on
    # attention-only models: "lru" (the radix tree, their default) or "hash" (block hashes); hybrids: "marconi" (default), "sglang+", "vllm+"
    prefix_cache_policy: str | None = None
    prefix_cache_alpha: float | None = None  # marconi's weight of FLOP efficiency against recency; None: tuned on the requests served
    prefix_caching_hash_algo: str = "sha256"  # vLLM's flag: "sha256", or "builtin" (Python's hash: faster, collides more; hits stay exact)
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    enable_chunked_prefill: bool = True
    preemption_mode: str = "recompute"
    max_logprobs: int = 20
    attention_backend: str = "auto"  # see kvtier.attention.registry
    mamba_cache_dtype: str = "auto"  # vLLM's flag: a hybrid's conv and SSM states ("auto": the model's dtype)
    mamba_ssm_cache_dtype: str = "auto"  # vLLM's flag: the SSM state alone ("auto": as mamba_cache_dtype)
    mamba_full_memory_ratio: float | None = None  # SGLang's flag: state bytes over K/V bytes; None: one slot per longest sequence
    kv_method: str = "none"  # a KV-cache method (kvtier.kv_methods.registry): "none" keeps the full cache
    kv_method_config: dict | str | None = None  # the method's config, a dict or a JSON object string: {"budget": 0.25, ...}

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise InvalidArgumentError("model", f"must be a path to an HF checkpoint folder or a shipped model's name, got {self.model!r}")
        self.model = resolve_model(self.model)
        if self.tokenizer is not None:
            self.tokenizer = resolve_model(self.tokenizer)
        for name in ("dtype", "mamba_cache_dtype", "mamba_ssm_cache_dtype"):
            if getattr(self, name) not in ("auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16", "half", "float"):
                raise InvalidArgumentError(name, f"must be one of auto, float32, bfloat16, float16; got {getattr(self, name)!r}")
        if self.enable_prefix_caching not in (None, True, False):
            raise InvalidArgumentError("enable_prefix_caching", f"must be True, False or None (on), got {self.enable_prefix_caching!r}")
        if self.prefix_cache_policy not in (None, *PREFIX_CACHE_POLICIES):
            raise InvalidArgumentError("prefix_cache_policy", f"must be one of {', '.join(PREFIX_CACHE_POLICIES)}, got {self.prefix_cache_policy!r}")
        if self.prefix_cache_alpha is not None and not (isinstance(self.prefix_cache_alpha, (int, float)) and not isinstance(self.prefix_cache_alpha, bool)
                                                        and 0 <= self.prefix_cache_alpha <= 100):
            raise InvalidArgumentError("prefix_cache_alpha", f"must be a number in [0, 100], or None to tune it; got {self.prefix_cache_alpha!r}")
        if self.mamba_full_memory_ratio is not None and not (isinstance(self.mamba_full_memory_ratio, (int, float))
                                                             and 0 < self.mamba_full_memory_ratio < float("inf")):
            raise InvalidArgumentError("mamba_full_memory_ratio", f"must be a number > 0, or None for the default split; got {self.mamba_full_memory_ratio!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise InvalidArgumentError("device", f"must be auto, cpu or cuda; got {self.device!r}")
        _require_int("seed", self.seed, 0)
        if self.max_model_len is not None:
            _require_int("max_model_len", self.max_model_len, 1)
        _require_int("block_size", self.block_size, 1, 1024)
        if self.kv_cache_memory is not None:
            _require_int("kv_cache_memory", self.kv_cache_memory, 1)
        if self.kv_host_memory is not None:
            _require_int("kv_host_memory", self.kv_host_memory, 1)
        if not 0 < self.gpu_memory_utilization <= 1:
            raise InvalidArgumentError("gpu_memory_utilization", f"must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.swap_space < 0:
            raise InvalidArgumentError("swap_space", f"must be >= 0 GiB, got {self.swap_space}")
        _require_int("max_num_seqs", self.max_num_seqs, 1)
        if self.max_num_batched_tokens is not None:
            _require_int("max_num_batched_tokens", self.max_num_batched_tokens, 1)
        if self.prefix_caching_hash_algo not in HASH_ALGOS:
            raise InvalidArgumentError("prefix_caching_hash_algo", f"must be one of {', '.join(HASH_ALGOS)}; got {self.prefix_caching_hash_algo!r}")
        if self.preemption_mode not in ("recompute", "swap"):
            raise InvalidArgumentError("preemption_mode", f"must be 'recompute' or 'swap', got {self.preemption_mode!r}")
        _require_int("max_logprobs", self.max_logprobs, 0)
        check_backend_name(self.attention_backend)  # an unknown name fails here, listing the known ones
        self.kv_method_config = parse_config(self.kv_method_config)
        build_method(self.kv_method, self.kv_method_config)  # an unknown method or a bad config fails here, naming the field

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    def resolve_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise InvalidArgumentError("device", "cuda was asked for but no CUDA device is available")
        return torch.device(self.device)
