"""Peak memory of a process and its descendants, sampled from /proc: the same measure for kvtier (one process) and
vLLM (a front end, an engine core and a worker), so the two are compared on equal terms.

Each sample sums the processes' proportional set size (Pss in /proc/PID/smaps_rollup): a page shared by n processes
(torch's libraries, mapped in each of vLLM's) counts 1/n in each, so the sum is what the tree really holds.
"""

from __future__ import annotations

import threading
from pathlib import Path


def _tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            try:
                todo += [int(c) for c in task.read_text().split()]
            except OSError:
                pass
    return pids


def tree_pss_mib(pid: int) -> float:
    """The process tree's proportional set size now, MiB (processes that end while it is read count 0)."""
    total_kib = 0
    for p in _tree(pid):
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total_kib += int(line.split()[1])
                    break
        except OSError:
            pass
    return total_kib / 1024


class PeakMemory:
    """``with PeakMemory(pid) as m: ...``, then ``m.peak_mib``: the largest tree PSS seen, sampled every ``interval_s``
    (reading smaps_rollup of a process of a few GB takes about 15 ms: once a second keeps the sampler's own cost near 1%
    of a core; both engines allocate their KV pool and weights up front, so the peak lasts)."""

    def __init__(self, pid: int, interval_s: float = 1.0) -> None:
        self.pid, self.interval_s, self.peak_mib = pid, interval_s, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            self.peak_mib = max(self.peak_mib, tree_pss_mib(self.pid))
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mib = max(self.peak_mib, tree_pss_mib(self.pid))
