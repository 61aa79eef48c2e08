"""The training corpus every machine has: the running interpreter's standard-library sources.

Files (code, docstrings, comments) are split into train and validation by file, with a fixed seed,
so a validation file is never seen in training. ``site-packages`` is excluded: it differs by machine.
"""

from __future__ import annotations

import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CorpusSplit:
    root: Path
    train: tuple[Path, ...]
    validation: tuple[Path, ...]


def stdlib_sources(root: Path | None = None) -> list[Path]:
    """Every ``*.py`` under the standard library, sorted by relative path, without ``site-packages``."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts and p.is_file()]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def split_corpus(validation_fraction: float = 0.02, seed: int = 0, root: Path | None = None) -> CorpusSplit:
    """Shuffle the files with ``seed`` and hold out ``validation_fraction`` of them (at least one)."""
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    files = stdlib_sources(root)
    if len(files) < 2:
        raise RuntimeError(f"the standard library at {root or sysconfig.get_paths()['stdlib']} has fewer than 2 source files")
    random.Random(seed).shuffle(files)
    n_val = max(1, round(len(files) * validation_fraction))
    return CorpusSplit(Path(root or sysconfig.get_paths()["stdlib"]), tuple(files[n_val:]), tuple(files[:n_val]))


def read_texts(files: tuple[Path, ...]) -> list[str]:
    """File contents, undecodable bytes replaced (a few stdlib test files hold deliberate bad encodings)."""
    return [p.read_bytes().decode("utf-8", errors="replace") for p in files]
