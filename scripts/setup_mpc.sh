#!/usr/bin/env bash
# Create .venv-mpc: SecretFlow's SPU, the MPC framework kvtier's private decoding runs on. Its own environment because
# spu 0.9.5 needs numpy<2 and jax<=0.4.34 while kvtier pins numpy 2; kvtier drives it in a subprocess
# (kvtier/mpc/driver.py). Idempotent: does nothing when the environment already imports spu.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv-mpc/bin/python ] && .venv-mpc/bin/python -c "import spu, jax" 2>/dev/null; then exit 0; fi
python3.11 -m venv .venv-mpc 2>/dev/null || python3 -m venv .venv-mpc
.venv-mpc/bin/pip install -q --upgrade pip
.venv-mpc/bin/pip install -q spu==0.9.5 numpy==1.26.4 jax==0.4.34 jaxlib==0.4.34
