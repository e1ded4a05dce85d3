#!/usr/bin/env bash
# The token-budget race on one GPU (at most 9 min on an H100/H200: timeouts bound each part, the ablation gets what
# is left of GPU_RACE_BUDGET_S=540 s):
#
#   bash benchmarks/gpu_race.sh                     # on the GPU machine, with data/fashion-mnist/ carried along
#   GPU_RACE_SMOKE=1 bash benchmarks/gpu_race.sh    # the same script on this CPU at toy size (~6 min here)
#
# Before a GPU call, put the four Fashion-MNIST files where the run finds them (the GPU machine has no network and
# no Debian package): mkdir -p data && cp -r /usr/share/datasets/fashion-mnist data/ ; then carry data/fashion-mnist.
#
# Parts, each PASS / FAIL / TIMEOUT with its last lines, the others going on:
#   1. throughput and MFU of pit_mini and pit_tiny against timm's ViT of the same shape at 784, 1,024 and 4,096
#      tokens (benchmarks/gpu_mfu.py, bf16);
#   2. the race of benchmarks/time_to_accuracy.py on the GPU: plain against budget (4 epochs each), seeds 0-2, batch
#      256 at lr 2e-3, bf16-mixed, Fashion-MNIST 28x28, the full training set, evaluated every 25 steps on 1,000
#      test images and at the end on all 10,000; then the ablation (each lever at 2 epochs, seed 0) and the report
#      (summary.json, plot, section).
# Outputs in $OUT when set, else benchmarks/results/gpu_race/: gpu_race.log, mfu.json, tta/ (points, calibration,
# summary.json, time_to_accuracy.png, section.md).
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 2
OUT_DIR="${OUT:-$REPO/benchmarks/results/gpu_race}"
mkdir -p "$OUT_DIR"
exec > >(tee "$OUT_DIR/gpu_race.log") 2>&1

PYTHON="${PYTHON:-}"
for candidate in .venv/bin/python python3 python; do
  [ -n "$PYTHON" ] && break
  if command -v "$candidate" > /dev/null 2>&1 && "$candidate" -c "import torch" > /dev/null 2>&1; then
    PYTHON="$candidate"
  fi
done
[ -n "$PYTHON" ] || { echo "FAIL: no python that imports torch"; exit 3; }
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" WANDB_MODE=disabled WANDB_SILENT=true MPLBACKEND=Agg PYTHONUNBUFFERED=1

DATA="${GPU_RACE_DATA:-$REPO/data/fashion-mnist}"
[ -d "$DATA" ] || [ -n "${GPU_RACE_DATA:-}" ] || DATA=/usr/share/datasets/fashion-mnist
for f in train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz; do
  [ -f "$DATA/$f" ] || { echo "FAIL: $DATA/$f is missing: mkdir -p data &&" \
    "cp -r /usr/share/datasets/fashion-mnist data/, then carry data/fashion-mnist (or set GPU_RACE_DATA)"; exit 4; }
done
if [ "${GPU_RACE_SMOKE:-0}" = 1 ]; then
  MFU_ARGS="--device cpu --models pit_mini --tokens 64 --steps 2 --warmup 1 --batch 2 --depth 2 --matmul-size 512"
  TTA_ARGS="--device cpu --variants plain,budget --seeds 0 --batch 16 --train-images 160 --epochs plain=1,budget=1
            --eval-every 5 --eval-images 50 --final-images 100"
  ABLATION_ARGS="--device cpu --variants drop75 --seeds 0 --batch 16 --train-images 160 --epochs drop75=1
                 --eval-every 5 --eval-images 50 --final-images 100"
  MFU_TIMEOUT=300; TTA_TIMEOUT=900
else
  MFU_ARGS="--device cuda --models pit_mini pit_tiny --tokens 784 1024 4096"
  # Batch 256 takes a quarter of the CPU race's steps (938 in 4 epochs), so the learning rate grows by sqrt(4), a
  # common rule for AdamW: at 1e-3 plain would likely fall short of the target (not yet tried on a GPU).
  TTA_ARGS="--device cuda --variants plain,budget --seeds 0,1,2 --batch 256 --lr 2e-3 --eval-every 25 --eval-images 1000"
  ABLATION_ARGS="--device cuda --variants drop75,drop75_nofull,drop50,lowres,drop75_lowres,hourglass,hourglass_lowres --seeds 0 --batch 256
                 --lr 2e-3 --eval-every 25 --eval-images 1000"
  MFU_TIMEOUT=150; TTA_TIMEOUT=360
fi
echo "python: $PYTHON ($("$PYTHON" -c 'import torch; print(torch.__version__, torch.cuda.is_available())'))"
echo "data: $DATA"
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader

part() {  # name timeout command...
  local name="$1" limit="$2"; shift 2
  local start=$(date +%s)
  echo "==== $name"
  timeout "$limit" "$@"
  local rc=$?
  local verdict=PASS; [ $rc -eq 124 ] && verdict=TIMEOUT; [ $rc -ne 0 ] && [ $rc -ne 124 ] && verdict="FAIL ($rc)"
  echo "==== $name: $verdict after $(( $(date +%s) - start )) s"
}

part "MFU vs timm" "$MFU_TIMEOUT" "$PYTHON" benchmarks/gpu_mfu.py $MFU_ARGS --out "$OUT_DIR/mfu.json"
# shellcheck disable=SC2086
part "time to accuracy" "$TTA_TIMEOUT" "$PYTHON" benchmarks/time_to_accuracy.py $TTA_ARGS --data-root "$DATA" \
  --out "$OUT_DIR/tta" --runs "${TMPDIR:-/tmp}/gpu_race_runs"
# The ablation gets what is left of one device call (600 s at most) after the race, less the report's minute.
LEFT=$(( ${GPU_RACE_BUDGET_S:-540} - SECONDS - 60 ))
[ "${GPU_RACE_SMOKE:-0}" = 1 ] && LEFT=$TTA_TIMEOUT
[ "$LEFT" -lt 30 ] && { echo "==== ablation: SKIPPED (no time left in the call)"; ABLATION_ARGS=""; LEFT=1; }
# shellcheck disable=SC2086
[ -n "$ABLATION_ARGS" ] && part "ablation" "$LEFT" "$PYTHON" benchmarks/time_to_accuracy.py $ABLATION_ARGS --data-root "$DATA" \
  --out "$OUT_DIR/tta" --runs "${TMPDIR:-/tmp}/gpu_race_runs"
DEVICE=$([ "${GPU_RACE_SMOKE:-0}" = 1 ] && echo cpu || echo cuda)
part "race report" 60 "$PYTHON" benchmarks/time_to_accuracy.py --report --device "$DEVICE" --out "$OUT_DIR/tta"
