"""kvtier's side of the MPC worker: a job (tasks and their input arrays) written to a temporary folder, the worker run
in the MPC environment's Python, and its results read back. Arrays cross as .npz, so the two sides share no Python
objects and each keeps its own numpy."""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from kvtier.errors import KvtierError
from kvtier.mpc.environment import WORKER, mpc_python

PROTOCOLS = {"semi2k": 2, "cheetah": 2, "aby3": 3}  # SPU's protocols kvtier drives, with their number of parties


class MPCWorkerError(KvtierError, RuntimeError):
    """The MPC worker failed; the message carries the end of its error output."""


def run_mpc(tasks: list[dict], arrays: dict[str, np.ndarray] | None = None, timeout: float = 3600) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Run ``tasks`` (see kvtier/mpc/spu_worker.py) in the MPC environment: each task's result (costs from SPU's own
    counters) and the outputs it reconstructed, keyed ``"<task index>/<name>"``."""
    python = mpc_python()
    with tempfile.TemporaryDirectory(prefix="kvtier-mpc-") as tmp:
        folder = Path(tmp)
        job = {"tasks": tasks, "result": str(folder / "result.json"), "outputs": str(folder / "outputs.npz")}
        if arrays:
            np.savez(folder / "inputs.npz", **{k: np.ascontiguousarray(v, dtype=np.float32) for k, v in arrays.items()})
            job["inputs"] = str(folder / "inputs.npz")
        (folder / "job.json").write_text(json.dumps(job))
        # in the job's folder: SPU's Beaver cache may spill opened masks to a database in the working directory
        done = subprocess.run([str(python), str(WORKER), str(folder / "job.json")], capture_output=True, text=True, timeout=timeout, cwd=folder)
        if done.returncode:
            raise MPCWorkerError(f"the MPC worker exited with {done.returncode}: {done.stderr.strip()[-2000:]}")
        results = json.loads((folder / "result.json").read_text())
        with np.load(folder / "outputs.npz") as outs:
            return results, {k: outs[k] for k in outs.files}
