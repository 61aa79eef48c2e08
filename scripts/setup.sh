#!/usr/bin/env bash
# Create .venv with the pinned CPU build of PyTorch first (a bare `torch` requirement would pull
# CUDA wheels), then kvtier itself. Pass `test` to add the test dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q torch==2.13.0
if [ "${1:-}" = "test" ]; then
  .venv/bin/pip install -q -e '.[test]'
else
  .venv/bin/pip install -q -e .
fi
