#!/usr/bin/env bash
# The prepared GPU check: on one CUDA GPU with torch preinstalled and no network, run the
# memory bench (learner step + teacher pass at V = 151,936, chunked vs dense) and the
# pipeline bench with the gpu preset (random-init ~0.5B student / ~1.5B teacher), and, when
# vLLM imports, the pipeline with the vLLM engines. About 6-8 minutes on an H200.
#
#   scripts/device-check.sh OUT_DIR [WHEEL_DIR]
#
# OUT_DIR receives memory-gpu.json, pipeline-gpu.json (+ pipeline-gpu-vllm.json) and a log
# of each. WHEEL_DIR: wheels of the project's other dependencies for the GPU machine's Python
# (scripts/device-wheels.sh makes them); they are unpacked into a private site dir, never
# over the machine's torch. OPD_DEVICE_CHECK_CPU=1 runs a seconds-long version without CUDA
# (to try the script itself).
set -uo pipefail
out="${1:?usage: scripts/device-check.sh OUT_DIR [WHEEL_DIR]}"
wheels="${2:-}"
cd "$(dirname "$0")/.." || exit 1
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -n "$wheels" ]; then
  site=$(mktemp -d)
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" "$wheels"/*.whl || exit 1
  export PYTHONPATH="$PYTHONPATH:$site"  # after the repo, and torch stays the machine's
fi
status=0
step() {  # step NAME TIMEOUT_S ARGS...: one bench, its log, and a line in the summary
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout "$limit" python3 -m services.cli bench "$@" >"$out/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc after $((SECONDS - t0)) s" | tee -a "$out/summary.txt"
  [ "$rc" -eq 0 ] || { status=1; tail -20 "$out/$name.log"; }
}
python3 - <<'PY' | tee "$out/summary.txt"
import torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PY
if [ "${OPD_DEVICE_CHECK_CPU:-0}" = 1 ]; then
  step memory-gpu 300 memory --device cpu --tokens 256,1024 --vocab 8192 --completion-tokens 128 \
    --json-out "$out/memory-gpu.json"
  step pipeline-gpu 300 pipeline --preset cpu-test --steps 3 --json-out "$out/pipeline-gpu.json"
  exit "$status"
fi
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')" || exit 1
# 0.5B-shaped student and teacher: chunked 4k/16k/64k tokens; dense where it fits (bf16 as on GPUs)
step memory-gpu 200 memory --device cuda --size 0.5b --dtype bfloat16 --tokens 4096,16384,65536 \
  --json-out "$out/memory-gpu.json"
step pipeline-gpu 200 pipeline --preset gpu --json-out "$out/pipeline-gpu.json"
if python3 -c "import vllm" 2>/dev/null; then
  OPD_ROLLOUT_GPU_MEMORY_UTILIZATION=0.3 OPD_TEACHER_GPU_MEMORY_UTILIZATION=0.3 \
    step pipeline-gpu-vllm 150 pipeline --preset gpu --engine vllm --json-out "$out/pipeline-gpu-vllm.json"
else
  echo "vllm: not importable on this machine, vLLM engines not measured" | tee -a "$out/summary.txt"
fi
exit "$status"
