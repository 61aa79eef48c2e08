"""The haystack-retrieval benchmark runs its grid through the engine and keeps every cell; the shipped kvtier-tiny finds
a pass key said in its training phrasing both in the filler and in text it never saw (the held-out idlelib files)."""

from __future__ import annotations

import json

from haystack_retrieval import main, table  # benchmarks/haystack_retrieval.py


def test_a_small_grid_keeps_every_cell(tmp_path, capsys):
    out = tmp_path / "grid.json"
    assert main(["--tasks", "passkey", "--haystacks", "noise", "heldout", "--contexts", "512", "--trials", "10", "--json-out", str(out)]) == 0
    result = json.loads(out.read_text())
    cells = {(c["phrasing"], c["haystack"]): c for c in result["cells"]}
    assert set(cells) == {(p, h) for p in ("landmark", "access-code") for h in ("noise", "heldout")}
    assert all(c["trials"] == 10 and c["context_tokens"] == 512 for c in cells.values())
    assert cells["landmark", "noise"]["accuracy"] >= 0.9 and cells["landmark", "heldout"]["accuracy"] >= 0.8
    assert "| passkey | landmark |" in table(result) and "| passkey | landmark |" in capsys.readouterr().out
