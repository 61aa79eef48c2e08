"""Where a benchmark's report goes: its table printed, and written as JSON and markdown when asked."""

from __future__ import annotations

import json
from pathlib import Path

from kvtier.eval.harness import markdown_table


def write_report(result: dict, text: str, json_out: Path | None, markdown_out: Path | None) -> None:
    print(text)
    if json_out:
        json_out.write_text(json.dumps(result, indent=1) + "\n")
    if markdown_out:
        markdown_out.write_text(text + "\n")


def eval_sections(result: dict, accuracy_title: str = "Accuracy") -> list[str]:
    """The report lines of a KV-method benchmark's ``kvtier eval`` grids: accuracy, then ablations, where present."""
    lines: list[str] = []
    if "accuracy" in result:
        lines += [f"{accuracy_title} (`kvtier eval`):", "", markdown_table(result["accuracy"]), ""]
    if "ablation" in result:
        lines += ["Ablations (`kvtier eval --variant`):", "", markdown_table(result["ablation"]), ""]
    return lines
