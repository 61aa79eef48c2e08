"""Build a model from an HF checkpoint folder: config, architecture, safetensors (sharded or not)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from kvtier.attention.backend import AttentionBackend
from kvtier.errors import ModelNotFoundError
from kvtier.models.config import ModelConfig
from kvtier.models.embedded import embedded_models
from kvtier.models.registry import model_class


def resolve_model_path(model: str | Path) -> Path:
    path = Path(model).expanduser()
    if not path.is_dir():
        raise ModelNotFoundError(f"model: {str(model)!r} is not a checkpoint folder (expected config.json, *.safetensors, tokenizer.json) "
                                 f"nor a shipped model (shipped: {', '.join(embedded_models()) or 'none'})")
    return path


def safetensors_files(path: Path) -> list[Path]:
    """The weight files, in the order a sharded index lists them (or sorted)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [path / f for f in dict.fromkeys(weight_map.values())]
    else:
        files = sorted(path.glob("*.safetensors"))
    missing = [f.name for f in files if not f.is_file()]
    if not files or missing:
        raise ModelNotFoundError(f"model: {path} has no weights (missing: {', '.join(missing) or '*.safetensors'})")
    return files


def iter_weights(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    for file in safetensors_files(path):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def load_model(path: Path, cfg: ModelConfig, dtype: torch.dtype, device: torch.device, max_positions: int, backend: AttentionBackend) -> nn.Module:
    """Instantiate the architecture directly in ``dtype`` on ``device``, attending through ``backend``, and fill its weights."""
    cls = model_class(cfg.architecture)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(cfg, max_positions, backend)
    finally:
        torch.set_default_dtype(prev)
    model.load_weights(iter_weights(path))
    return model.eval().requires_grad_(False)
