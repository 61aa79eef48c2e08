#!/usr/bin/env bash
# Create .venv-kvpress: kvpress (NVIDIA's KV-compression presses on HF transformers), the reference the KV-method tests
# check kvtier against. Its own environment because kvpress 0.5.5 pins transformers<5.3 while kvtier uses a newer one;
# the tests drive it in a subprocess (tests/kv_methods/kvpress_reference.py) and skip nothing: they build it if absent.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv-kvpress/bin/python ] && .venv-kvpress/bin/python -c "import kvpress" 2>/dev/null; then exit 0; fi
python3 -m venv .venv-kvpress
.venv-kvpress/bin/pip install -q --upgrade pip
.venv-kvpress/bin/pip install -q torch==2.13.0
.venv-kvpress/bin/pip install -q kvpress==0.5.5 transformers==5.2.0
