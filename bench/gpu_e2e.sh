#!/usr/bin/env bash
# The whole job on ONE GPU (issue 12): `slipstream bench e2e` on examples/gpu/one_gpu.toml (trainer
# and engine colocated on GPU 0, weights by CUDA IPC, Qwen3-0.6B shape made locally, random init,
# bf16; 16 prompts x 8 samples x 256 new tokens per step), the same 30 steps at max_staleness 0
# (the synchronous baseline) and 2, measured in the same run. Writes under $OUT:
#   <date>-e2e-1xh200.json           the two runs side by side (command, device, date, placement)
#   <date>-e2e-1xh200-runs/eta{0,2}/ each run's logs, steps.jsonl, summary.json, processes.json
#   gpu_e2e.log                      this script's output (the summary table is at its end)
#
# Needs, beyond the GPU image: the wheels of pyzmq and megatron-core (cp312), installed first:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
# Then, from the repository root:
#   OUT=$OUT bash bench/gpu_e2e.sh                # ~5-8 minutes; hard stop at 9 (see MAX_RUN_S)
# Knobs (environment): STEPS (30), STALENESS (0,2), BUDGET_S (525: the whole script's time), MAX_RUN_S (default: what
# is left of the budget after the model is made, halved, less 30 s; a run still going then is
# interrupted and the comparison uses the steps both runs completed; the JSON says so), CONFIG, PRESET, MODEL_DIR, and SETS
# (space-separated key=value overrides for both runs). The multi-GPU runs of issue 20 use the same
# script on a machine with more GPUs:
#   CONFIG=examples/gpu/multi_gpu.toml bash bench/gpu_e2e.sh                        # 2 GPUs: trainer | engine
#   CONFIG=examples/gpu/multi_gpu.toml SETS="trainer.tensor_parallel=2 producer.num_engines=2" bash bench/gpu_e2e.sh  # 4 GPUs
# a profiled run (torch.profiler windows of steps 12..14 in the trainer and the engine, pipeline/profiling.py):
#   STALENESS=2 STEPS=20 SETS="run.profile_steps=[12,14]" bash bench/gpu_e2e.sh
# and a CPU smoke test of the script itself: CONFIG=examples/tiny/config.toml PRESET=tiny STEPS=3 OUT=/tmp/o bash bench/gpu_e2e.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
STEPS=${STEPS:-30}
STALENESS=${STALENESS:-0,2}   # comma-separated; the first is the baseline
BUDGET_S=${BUDGET_S:-525}   # the whole script stays under 9 minutes
T_START=$(date +%s)
CONFIG=${CONFIG:-examples/gpu/one_gpu.toml}
PRESET=${PRESET:-qwen3-0.6b}
MODEL_DIR=${MODEL_DIR:-/tmp/slipstream-$PRESET}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0} TORCH_SYMM_MEM_DISABLE_MULTICAST=${TORCH_SYMM_MEM_DISABLE_MULTICAST:-1}
exec > >(tee "$OUT/gpu_e2e.log") 2>&1
echo "== $(date -u +%FT%TZ) bench/gpu_e2e.sh: CONFIG=$CONFIG STEPS=$STEPS BUDGET_S=$BUDGET_S"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, zmq, megatron.core as m; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'devices', torch.cuda.device_count(), 'megatron-core', m.__version__, 'pyzmq', zmq.__version__)" || { echo "missing packages (carry the pyzmq and megatron-core wheels)"; exit 3; }
python3 -c "import pynvml" 2>/dev/null && echo "GPU sampling: NVML" || echo "GPU sampling: nvidia-smi (no pynvml)"
ARGS=(--set "model.path='$MODEL_DIR'")
for kv in ${SETS:-}; do ARGS+=(--set "$kv"); done
python3 -m pipeline.cli run "$CONFIG" --dry-run "${ARGS[@]}" > /dev/null || exit 2   # prints the placement plan
t0=$(date +%s)
python3 -m pipeline.cli make-model "$MODEL_DIR" --preset "$PRESET" || exit 4
echo "model made in $(( $(date +%s) - t0 )) s"
left=$(( BUDGET_S - ($(date +%s) - T_START) ))
MAX_RUN_S=${MAX_RUN_S:-$(( left / 2 - 30 ))}   # room for each run to stop cleanly
echo "$left s left: at most $MAX_RUN_S s per run"
timeout "$left" python3 -m pipeline.cli bench e2e "$CONFIG" --steps "$STEPS" --staleness "$STALENESS" --max-run-seconds "$MAX_RUN_S" \
    --out "$OUT" "${ARGS[@]}"
rc=$?
echo "== bench e2e exit code $rc after $(( $(date +%s) - t0 )) s"
exit $rc
