"""Private greedy generation: a Llama checkpoint's weights and the prompt secret-shared under SecretFlow SPU, prefill and
every decoding step computed on the shares, with the full cache or MPCache's eviction and cluster selection; only the
generated tokens are revealed to the client. kvtier plans it (MPCache's public counts come from the plaintext method,
kvtier.kv_methods.mpcache, so both choose alike) and the MPC environment runs it (kvtier/mpc/spu_generate.py).

    from kvtier.mpc.private_generate import private_generate
    out = private_generate("kvtier-tiny", "def add(a, b):", max_tokens=4, kv_method="mpcache", kv_method_config={"budget": 0.25})
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from kvtier.errors import InvalidArgumentError
from kvtier.kv_methods.mpcache import MPCache
from kvtier.kv_methods.registry import build_method, parse_config
from kvtier.models.config import ModelConfig
from kvtier.models.embedded import resolve_model
from kvtier.models.loader import iter_weights, resolve_model_path
from kvtier.mpc.driver import PROTOCOLS, run_mpc
from kvtier.mpc.network import NETWORKS
from kvtier.tokenizer import Tokenizer

MAX_PROMPT = 512  # prefill under MPC is measured at small T: its attention is quadratic in secret
METHODS = ("none", "mpcache")


@dataclass
class PrivateGeneration:
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    programs: list[dict]  # per SPU program (prefill, eviction, each decoding step): bytes, rounds, seconds, latency per network
    logits: np.ndarray | None = field(default=None, repr=False)  # [tokens, vocab] when revealed to the client


def _llama_arrays(path, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """The checkpoint as float32 arrays under the worker's names."""
    names = {"model.embed_tokens.weight": "embed", "model.norm.weight": "norm", "lm_head.weight": "lm_head"}
    arrays = {}
    for name, tensor in iter_weights(path):
        short = names.get(name)
        if short is None and name.startswith("model.layers."):
            layer, rest = name.removeprefix("model.layers.").split(".", 1)
            short = f"layers.{layer}.{rest.split('.')[-2]}"
        if short is not None:
            arrays[short] = tensor.to(torch.float32).numpy()
    if cfg.tie_word_embeddings or "lm_head" not in arrays:
        arrays["lm_head"] = arrays["embed"]
    return arrays


def _check(cfg: ModelConfig, prompt: list[int], max_tokens: int, protocol: str, kv_method: str) -> None:
    if cfg.architecture != "LlamaForCausalLM" or cfg.attention_bias or cfg.mlp_bias or cfg.qk_norm or cfg.rope is None \
            or cfg.rope.rope_type != "default" or any(cfg.sliding_windows):
        raise InvalidArgumentError("model", f"private generation runs plain Llama checkpoints (no biases, default RoPE); got {cfg.architecture}")
    if not 1 <= len(prompt) <= MAX_PROMPT:
        raise InvalidArgumentError("prompt", f"must be 1 to {MAX_PROMPT} tokens under MPC, got {len(prompt)}")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= 256:
        raise InvalidArgumentError("max_tokens", f"must be an integer in [1, 256], got {max_tokens!r}")
    if protocol not in PROTOCOLS:
        raise InvalidArgumentError("protocol", f"must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    if kv_method not in METHODS:
        raise InvalidArgumentError("kv_method", f"must be one of {', '.join(METHODS)} under MPC, got {kv_method!r}")


def mpcache_plan(method: MPCache, prompt_len: int, max_tokens: int, layers: int) -> dict:
    """The public side of MPCache under MPC, decided as the plaintext method decides it: the window, the tokens the
    static eviction keeps, which layers share, and each decoding step's cluster counts."""
    cfg = method.config
    if cfg.gamma is not None:
        raise InvalidArgumentError("kv_method_config.gamma", "a threshold makes the kept count depend on secret attention: under MPC give "
                                   "static_keep (a public ratio) instead")
    if cfg.granularity != "cluster":
        raise InvalidArgumentError("kv_method_config.granularity", "under MPC MPCache gathers whole clusters (a one-hot over clusters, not "
                                   "tokens): granularity 'cluster'")
    kept = cfg.static_kept(prompt_len)
    steps = []
    for step in range(max_tokens - 1):
        keep1, keep2 = method.clusters_read(kept + step + 1, prompt_len + step + 1)
        steps.append({"keep1": keep1, "keep2": keep2})
    return {"window": max(1, math.floor(prompt_len * cfg.window_ratio)), "kept": kept, "shares": [method.shares(i) for i in range(layers)],
            "steps": steps, "bound": cfg.bound, "alpha": cfg.alpha, "size1": cfg.cluster_size1, "size2": cfg.cluster_size2, "hierarchy": cfg.hierarchy}


def private_generate(model: str = "kvtier-tiny", prompt: str | None = None, prompt_token_ids: list[int] | None = None, max_tokens: int = 8,
                     kv_method: str = "none", kv_method_config: dict | str | None = None, protocol: str = "semi2k",
                     reveal_logits: bool = False, timeout: float = 3600) -> PrivateGeneration:
    """Greedy generation with weights, prompt, cache and every intermediate secret-shared between the protocol's parties
    (``semi2k``, ``cheetah``: two; ``aby3``: three). Raises MPCUnavailableError, saying how to make the MPC
    environment, when it is missing."""
    path = resolve_model_path(resolve_model(model))
    cfg = ModelConfig.from_pretrained(path)
    if (prompt is None) == (prompt_token_ids is None):
        raise InvalidArgumentError("prompt", "give exactly one of prompt (text) and prompt_token_ids")
    tokenizer = Tokenizer.from_pretrained(path)
    ids = list(prompt_token_ids) if prompt_token_ids is not None else tokenizer.encode(prompt)
    if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < cfg.vocab_size for t in ids):
        raise InvalidArgumentError("prompt_token_ids", f"must be token ids in [0, {cfg.vocab_size - 1}]")
    _check(cfg, ids, max_tokens, protocol, kv_method)
    task = {"kind": "generate", "protocol": protocol, "prompt": ids, "max_tokens": max_tokens, "reveal_logits": reveal_logits,
            "shape": {"hidden": cfg.hidden_size, "heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
                      "layers": cfg.num_hidden_layers, "vocab": cfg.vocab_size, "eps": cfg.rms_norm_eps, "theta": cfg.rope.theta}}
    if kv_method == "mpcache":
        method = build_method("mpcache", parse_config(kv_method_config))
        task["mpcache"] = mpcache_plan(method, len(ids), max_tokens, cfg.num_hidden_layers)
    elif kv_method_config:
        raise InvalidArgumentError("kv_method_config", "is for kv_method mpcache")
    arrays = _llama_arrays(path, cfg)
    task["names"], task["prefix"] = list(arrays), ""
    (result,), outputs = run_mpc([task], arrays, timeout=timeout)
    programs = [{**p, "latency_s": {n.name: n.seconds(p["bytes"], p["rounds"]) for n in NETWORKS}} for p in result["programs"]]
    tokens = [int(t) for t in result["tokens"]]
    return PrivateGeneration(ids, tokens, tokenizer.decode(tokens), programs, outputs.get("0/logits"))
