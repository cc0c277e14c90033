#!/usr/bin/env bash
# The prepared GPU check: on one CUDA GPU with torch preinstalled and no network, run the
# memory bench (learner step + teacher pass at V = 151,936, chunked vs dense), the pipeline
# bench with the gpu preset (random-init ~0.5B student / ~1.5B teacher) and the worker-hook
# bench (`opd bench hooks`: per-step hook time, before vs after batching). Then, when vLLM
# imports, the vLLM engines: the pipeline with both vLLM backends (the rollout with 4 MC
# samples, so the MC hook runs) and, when pytest imports too, the vLLM exactness tests
# (tests/test_vllm.py, all but the demo). When vLLM does not import, the summary says so and
# why. About 8-12 minutes on an H200 in all: more than one 600 s device call, so it runs as
# two parts (each call well inside 600 s):
#
#   DEVICE_CHECK_PART=core scripts/device-check.sh OUT_DIR [WHEEL_DIR]   # memory, pipeline, hooks (<= 400 s)
#   DEVICE_CHECK_PART=vllm scripts/device-check.sh OUT_DIR [WHEEL_DIR]   # the vLLM engines (<= 480 s)
#   scripts/device-check.sh OUT_DIR [WHEEL_DIR]                          # both, where no call limit applies
#
# OUT_DIR receives memory-gpu.json, pipeline-gpu.json, hooks-gpu.json (+ pipeline-gpu-vllm.json),
# a log of each step and summary.txt. WHEEL_DIR: wheels of the project's other dependencies
# for the GPU machine's Python (scripts/device-wheels.sh makes them); they are unpacked into
# a private site dir, never over the machine's torch. OPD_DEVICE_CHECK_CPU=1 runs a
# seconds-long version without CUDA (to try the script itself).
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
step() {  # step NAME TIMEOUT_S COMMAND...: one command, its log, and a line in the summary
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc after $((SECONDS - t0)) s" | tee -a "$out/summary.txt"
  [ "$rc" -eq 0 ] || { status=1; tail -20 "$out/$name.log"; }
}
bench() {  # bench NAME TIMEOUT_S ARGS...: one `opd bench` run
  local name=$1 limit=$2
  shift 2
  step "$name" "$limit" python3 -m services.cli bench "$@"
}
vllm_engines() {  # vllm_engines TIMEOUT_S PIPELINE_ARGS...: the vLLM engines if vLLM imports, else say why not
  local limit=$1 version
  shift
  if ! version=$(python3 -c "import vllm; print(vllm.__version__)" 2>&1); then
    echo "vllm: NOT importable on this machine, vLLM engines not run ($(echo "$version" | tail -1))" \
      | tee -a "$out/summary.txt"
    return
  fi
  echo "vllm: $(echo "$version" | tail -1) importable, running the vLLM engines" | tee -a "$out/summary.txt"
  # two engines share the GPU; VLLM_CPU_KVCACHE_SPACE (GiB) only matters to vLLM's CPU build
  export OPD_ROLLOUT_GPU_MEMORY_UTILIZATION=0.3 OPD_TEACHER_GPU_MEMORY_UTILIZATION=0.3 VLLM_CPU_KVCACHE_SPACE=1
  OPD_ROLLOUT_MC_SAMPLES=4 bench pipeline-gpu-vllm "$limit" pipeline "$@" --engine vllm \
    --json-out "$out/pipeline-gpu-vllm.json"
  if python3 -c "import pytest" 2>/dev/null; then
    step vllm-tests 240 python3 -m pytest -q -p no:cacheprovider -m vllm tests/test_vllm.py -k "not demo" -s
  else
    echo "pytest: not importable, vLLM exactness tests (tests/test_vllm.py) not run" | tee -a "$out/summary.txt"
  fi
}
python3 - <<'PY' | tee "$out/summary.txt"
import torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PY
if [ "${OPD_DEVICE_CHECK_CPU:-0}" = 1 ]; then
  bench memory-gpu 300 memory --device cpu --tokens 256,1024 --vocab 8192 --completion-tokens 128 \
    --json-out "$out/memory-gpu.json"
  bench pipeline-gpu 300 pipeline --preset cpu-test --steps 3 --json-out "$out/pipeline-gpu.json"
  bench hooks-gpu 120 hooks --device cpu --rows 8,64 --vocabs 64,8192 --repeats 2 --json-out "$out/hooks-gpu.json"
  vllm_engines 600 --preset tiny --device cpu --steps 3 --batch-size 8  # built-in models: 32-dim heads
  exit "$status"
fi
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')" || exit 1
part=${DEVICE_CHECK_PART:-all}
if [ "$part" != vllm ]; then
  # 0.5B-shaped student and teacher: chunked 4k/16k/64k tokens; dense where it fits (bf16 as on GPUs)
  bench memory-gpu 160 memory --device cuda --size 0.5b --dtype bfloat16 --tokens 4096,16384,65536 \
    --json-out "$out/memory-gpu.json"
  bench pipeline-gpu 160 pipeline --preset gpu --json-out "$out/pipeline-gpu.json"
  bench hooks-gpu 80 hooks --device cuda --json-out "$out/hooks-gpu.json"
fi
if [ "$part" != core ]; then
  vllm_engines 240 --preset gpu  # two runs (sync, async), each starting both engines; tests: 240 s
fi
exit "$status"
