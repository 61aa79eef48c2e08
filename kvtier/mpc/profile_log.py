"""SPU's own cost counters, read from the profile it logs after each run (``enable_hal_profile``,
``enable_pphlo_profile``): per operation and per party, the bytes sent and the send actions, and each party's link
totals. Pure Python: the MPC worker and kvtier both import it.

How the counts are combined: every party profiles its own link, so the log holds one ``Link details`` line per party.
Communication is the sum of the bytes every party sent. Rounds are the most send actions any one party made: a party
sends one message per action and waits on its peers between dependent steps, so this bounds the sequential message
rounds from above (messages a protocol sends side by side count once each).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

LINK = re.compile(r"Link details: total send bytes (\d+), recv bytes (\d+), send actions (\d+), recv actions (\d+)")
OP = re.compile(r"- (\S+), executed (\d+) times, duration ([0-9.eE+-]+)s, send bytes (\d+) recv bytes (\d+), send actions (\d+), recv actions (\d+)")
# HAL operations by name: SPU's HAL traces its ops as f_* (fixed point), i_* (integer), _* (ring level) and reveal /
# seal; its MPC kernels (a2b, mul_aa, perm_ss, ...) and HLO ops (pphlo.*) never take those names. The parties dump
# their profiles at the same moment, so the section headers of one can land among the other's lines: a line's name,
# not the last header seen, says which level it belongs to.
HAL_PREFIXES = ("f_", "i_", "_")
HAL_NAMES = ("reveal", "seal")


@dataclass
class Cost:
    """One program run's communication: total bytes sent by all parties, and rounds (the most send actions of a party)."""

    bytes: int = 0
    rounds: int = 0
    parties: int = 0
    ops: dict[str, dict[str, int]] = field(default_factory=dict)  # HAL-level op -> bytes (all parties), rounds (max over parties)

    def as_dict(self) -> dict:
        return {"bytes": self.bytes, "rounds": self.rounds, "parties": self.parties, "ops": self.ops}


def parse_profile(log: str, parties: int) -> Cost:
    """The cost of one run from its log; raises ValueError when a party's link totals are missing (profiling off, or
    the log was not captured), so a lost log never reads as a free computation."""
    links = [tuple(int(x) for x in m.groups()) for m in LINK.finditer(log)]
    if len(links) != parties:
        raise ValueError(f"expected {parties} 'Link details' lines (one per party) in SPU's profile log, found {len(links)}")
    ops: dict[str, dict[str, int]] = {}
    per_party_rounds: dict[str, list[int]] = {}
    for m in OP.finditer(log):
        name, sent, actions = m.group(1), int(m.group(4)), int(m.group(6))
        if name.startswith(HAL_PREFIXES) or name in HAL_NAMES:
            ops.setdefault(name, {"bytes": 0, "rounds": 0})["bytes"] += sent
            per_party_rounds.setdefault(name, []).append(actions)
    for name, rounds in per_party_rounds.items():
        ops[name]["rounds"] = max(rounds)
    return Cost(sum(link[0] for link in links), max(link[2] for link in links), parties, ops)


def side_by_side(costs: list[Cost]) -> Cost:
    """Programs that share no link and no value, run at once: their bytes add up, and the rounds are the busiest one's
    (per HAL operation too)."""
    ops: dict[str, dict[str, int]] = {}
    for cost in costs:
        for name, c in cost.ops.items():
            mine = ops.setdefault(name, {"bytes": 0, "rounds": 0})
            mine["bytes"] += c["bytes"]
            mine["rounds"] = max(mine["rounds"], c["rounds"])
    return Cost(sum(c.bytes for c in costs), max(c.rounds for c in costs), max(c.parties for c in costs), ops)
