#!/usr/bin/env bash
# `pytest -m gpu` on a GPU machine (the device tool's), its output kept: the GPU tests are skipped
# on CPU-only machines and CI has no GPU, so this is how they are run and recorded.
#   OUT=$OUT bash bench/gpu_pytest.sh [pytest args, e.g. tests/test_e2e_gpu.py]
# Writes $OUT/gpu-pytest.log (as it runs; -rA: every test's outcome) and $OUT/gpu-pytest.xml (JUnit).
# Knob: BUDGET_S (300): the whole pytest run is stopped after this long.
# Needs the pyzmq and megatron-core wheels installed first, as bench/gpu_e2e.sh says.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-pytest}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0} TORCH_SYMM_MEM_DISABLE_MULTICAST=${TORCH_SYMM_MEM_DISABLE_MULTICAST:-1}
echo "== $(date -u +%FT%TZ) pytest -m gpu $*" | tee "$OUT/gpu-pytest.log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$OUT/gpu-pytest.log"
timeout "${BUDGET_S:-300}" python3 -m pytest -m gpu -rA -p no:cacheprovider --junitxml "$OUT/gpu-pytest.xml" "$@" 2>&1 | tee -a "$OUT/gpu-pytest.log"
rc=${PIPESTATUS[0]}
echo "== pytest exit code $rc" | tee -a "$OUT/gpu-pytest.log"
exit "$rc"
