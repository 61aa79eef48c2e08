"""Where a benchmark's report goes: its table printed, and written as JSON and markdown when asked."""

from __future__ import annotations

import json
from pathlib import Path


def write_report(result: dict, text: str, json_out: Path | None, markdown_out: Path | None) -> None:
    print(text)
    if json_out:
        json_out.write_text(json.dumps(result, indent=1) + "\n")
    if markdown_out:
        markdown_out.write_text(text + "\n")
