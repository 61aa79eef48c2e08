"""Where the MPC environment is: a separate Python with SecretFlow SPU (numpy < 2, jax <= 0.4.34), which kvtier
(numpy 2) cannot import, so it runs the MPC side in a subprocess with that Python."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from kvtier.errors import MPCUnavailableError

ROOT = Path(__file__).resolve().parents[2]
SETUP = ROOT / "scripts" / "setup_mpc.sh"
WORKER = Path(__file__).with_name("spu_worker.py")


def mpc_python() -> Path:
    """The MPC environment's interpreter: ``$KVTIER_MPC_PYTHON``, else .venv-mpc beside the checkout; a clear error
    saying how to make it when it is missing or cannot import spu."""
    python = Path(os.environ.get("KVTIER_MPC_PYTHON", ROOT / ".venv-mpc" / "bin" / "python"))
    how = (f"make it with `{SETUP}` (a Python 3.11 venv with spu==0.9.5, numpy 1.26, jax 0.4.34, at {ROOT / '.venv-mpc'}), "
           "or point KVTIER_MPC_PYTHON at a Python that imports spu")
    if not python.exists():
        raise MPCUnavailableError(f"private decoding needs the MPC environment, and {python} does not exist: {how}")
    check = subprocess.run([str(python), "-c", "import spu, jax"], capture_output=True, text=True)
    if check.returncode:
        raise MPCUnavailableError(f"private decoding needs the MPC environment, and {python} cannot import spu "
                                  f"({check.stderr.strip().splitlines()[-1] if check.stderr.strip() else 'no error text'}): {how}")
    return python
