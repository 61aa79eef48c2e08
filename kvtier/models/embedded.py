"""The models shipped inside the package, addressable by name: ``LLM("kvtier-tiny")``, ``--model kvtier-tiny-hybrid``.

No model can be downloaded where kvtier often runs, so two small trained checkpoints travel with the
code (see their model cards in ``kvtier/embedded/``). A name resolves to its folder; a path is kept.
"""

from __future__ import annotations

from pathlib import Path

EMBEDDED_DIR = Path(__file__).resolve().parent.parent / "embedded"
DEFAULT_MODEL = "kvtier-tiny"


def embedded_models() -> dict[str, Path]:
    """Name -> folder of every shipped model (a folder with a config.json)."""
    if not EMBEDDED_DIR.is_dir():
        return {}
    return {p.name: p for p in sorted(EMBEDDED_DIR.iterdir()) if (p / "config.json").is_file()}


def resolve_model(model: str) -> str:
    """``model`` itself when it is an existing path, else the folder of the shipped model of that name."""
    if Path(model).exists():
        return model
    shipped = embedded_models()
    return str(shipped[model]) if model in shipped else model
