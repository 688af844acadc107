#!/usr/bin/env bash
# One call on a GPU node: the engine benchmarks on CUDA and the test suite's GPU tests, with
# whatever `python` is on PATH (torch and transformers; Ray, FastAPI, uvicorn not needed), the
# repository on PYTHONPATH (nothing is installed). Everything lands in one folder:
#
#   benchmarks/results/gpu-<device name slug>-<UTC time>/
#     nvidia-smi.txt     nvidia-smi's report
#     gpu.txt            what benchmarks.gpu printed;  gpu.json, result.json: what it measured
#     pytest-gpu.txt     pytest -m gpu's output;       pytest-gpu.xml: its JUnit XML
#     check.txt          each step's exit status
#
#   bash benchmarks/gpu_check.sh            # ~7 minutes at most: every step has its timeout
#   PYTHON=python3.11 bash benchmarks/gpu_check.sh
#
# Exits 1 only when something ran and failed (the benchmark reported an error or timed out,
# a GPU test failed); a step that could not run (no nvidia-smi, no pytest, no GPU tests whose
# imports work here) is noted in check.txt and does not fail the check.

set -u

cd "$(dirname "$0")/.." || exit 2
PYTHON=${PYTHON:-python}
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"

# seconds per step; 30 + 330 + 60 + 120 = 540 at most, the GPU's own start-up within it
NVIDIA_SMI_S=30
BENCH_S=330
COLLECT_S=60
TESTS_S=120

device_name=$(timeout 60 "$PYTHON" -c \
  'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no-cuda")' \
  2>/dev/null || echo "unknown")
slug=$(printf '%s' "$device_name" | tr '[:upper:]' '[:lower:]' | tr -cs 'a-z0-9' '-' | sed 's/^-*//; s/-*$//')
out="benchmarks/results/gpu-${slug:-unknown}-$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$out" || exit 2
failed=0

note() {
  echo "$1" | tee -a "$out/check.txt"
}

# a step's status: 0 passed; 124 (timeout's) or any other: failed
record() {
  local step=$1 status=$2
  if [ "$status" -eq 0 ]; then
    note "$step: passed"
  elif [ "$status" -eq 124 ]; then
    note "$step: FAILED: timed out"
    failed=1
  else
    note "$step: FAILED: exit status $status"
    failed=1
  fi
}

note "gpu check on $device_name with $("$PYTHON" --version 2>&1), writing to $out"
if [ "$device_name" = "no-cuda" ] || [ "$device_name" = "unknown" ]; then
  note "warning: torch sees no CUDA device here ($device_name): the benchmark parts will be skipped"
fi

# 1. the driver's view of the GPUs
if command -v nvidia-smi >/dev/null 2>&1; then
  timeout "$NVIDIA_SMI_S" nvidia-smi >"$out/nvidia-smi.txt" 2>&1
  record "nvidia-smi" $?
else
  echo "nvidia-smi is not on PATH" >"$out/nvidia-smi.txt"
  note "nvidia-smi: not run (not on PATH)"
fi

# 2. the benchmarks (they write gpu.json and result.json after each part, so a timeout keeps
#    what was measured before it)
timeout "$BENCH_S" "$PYTHON" -m benchmarks.gpu --device cuda --out "$out" 2>&1 | tee "$out/gpu.txt"
record "benchmarks.gpu" "${PIPESTATUS[0]}"

# 3. the GPU tests whose imports work here. Test modules that import what this node lacks
#    (ray, fastapi) fail to collect and are passed over; without Ray the conftest files are
#    left out too (tests/unit/conftest.py's autouse fixture imports ray), so a GPU test that
#    needs a conftest fixture errors there.
pytest_log="$out/pytest-gpu.txt"
if ! timeout 60 "$PYTHON" -m pytest --version >/dev/null 2>&1; then
  echo "pytest is not installed for $PYTHON" >"$pytest_log"
  note "pytest -m gpu: not run (no pytest)"
else
  pytest_args=(-m gpu -p no:cacheprovider)
  if ! "$PYTHON" -c 'import ray' >/dev/null 2>&1; then
    pytest_args+=(--noconftest)
    echo "ray is not importable: running with --noconftest" >>"$pytest_log"
  fi
  collected=$(timeout "$COLLECT_S" "$PYTHON" -m pytest "${pytest_args[@]}" --collect-only -q \
    --continue-on-collection-errors tests 2>&1)
  collect_status=$?
  {
    echo "== collection (exit status $collect_status; collection errors are tests this node cannot import)"
    echo "$collected"
  } >>"$pytest_log"
  mapfile -t tests < <(printf '%s\n' "$collected" | grep '::' | grep -v '^ERROR' || true)
  if [ "$collect_status" -eq 124 ]; then
    record "pytest -m gpu (collection)" 124
  elif [ "${#tests[@]}" -eq 0 ]; then
    note "pytest -m gpu: not run (no gpu-marked tests collected here)"
  else
    echo "== run: ${#tests[@]} gpu-marked tests" >>"$pytest_log"
    timeout "$TESTS_S" "$PYTHON" -m pytest "${pytest_args[@]}" -q -rs \
      --junitxml="$out/pytest-gpu.xml" "${tests[@]}" >>"$pytest_log" 2>&1
    tests_status=$?
    [ "$tests_status" -eq 5 ] && tests_status=0 # 5: none ran (all deselected): nothing failed
    tail -n 5 "$pytest_log"
    record "pytest -m gpu (${#tests[@]} tests)" "$tests_status"
  fi
fi

note "results in $out"
exit "$failed"
