#!/usr/bin/env bash
# Fill deploy/wheels/ with every wheel the CPU image needs, so its build needs no network.
#
#   scripts/wheelhouse.sh                 # then: OPD_OFFLINE_WHEELS=1 docker compose ... build
#   PYTHON=python3.11 scripts/wheelhouse.sh
#
# Run on a machine that reaches the package indexes, with the base image's Python minor
# version (3.11 for python:3.11-slim and the Debian stand-in; binary wheels are per version).
# Downloads the pinned CPU torch, the project's dependencies and the build backend
# (setuptools: the image builds the project from source with --no-index).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
IMAGE_PYTHON=${IMAGE_PYTHON:-3.11}
have=$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
if [ "$have" != "$IMAGE_PYTHON" ]; then
  echo "$PYTHON is $have but the image runs $IMAGE_PYTHON: wheels would not match (set PYTHON)" >&2
  exit 1
fi
out=deploy/wheels
# The CPU wheel of torch: from the PyTorch CPU index unless pip already resolves it locally.
"$PYTHON" -m pip download -q -d "$out" --no-deps "torch==${TORCH_VERSION}" \
  || "$PYTHON" -m pip download -q -d "$out" --no-deps "torch==${TORCH_VERSION}" \
       --index-url https://download.pytorch.org/whl/cpu
# The project's dependencies (and theirs), resolved against that torch; then the backend.
"$PYTHON" -m pip wheel -q -w "$out" --find-links "$out" "torch==${TORCH_VERSION}" .
"$PYTHON" -m pip download -q -d "$out" "setuptools>=68" wheel
# Needed only below Python 3.11.3 (redis' marker), e.g. by Debian bookworm's 3.11.2 in the
# stand-in base, which the host's resolution above may have skipped.
"$PYTHON" -m pip download -q -d "$out" --no-deps "async-timeout>=4.0.3"
rm -f "$out"/asyncopd-*.whl   # the image builds the project from its own sources
echo "$(ls "$out"/*.whl | wc -l) wheels, $(du -sh "$out" | cut -f1) in $out" >&2
