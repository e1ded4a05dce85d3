#!/usr/bin/env bash
# One-shot GPU check of pixelformer: one command, about 3 minutes on one H200 (timeouts bound it to ~5):
#
#   bash benchmarks/gpu_check.sh                     # on the GPU machine (it cds to the repo root itself)
#   GPU_CHECK_SMOKE=1 bash benchmarks/gpu_check.sh   # CPU smoke test of this script: 4 steps, pit_mini (~3 min here)
#
# Parts, each reported PASS / FAIL / TIMEOUT (with its error's last lines) without stopping the others:
#   1. header: nvidia-smi, python / torch / CUDA versions, which packages are missing;
#   2. train cls, mae and dit on the embedded digits (no download) in bf16-mixed and 16-mixed, and FSDP
#      (trainer.strategy=fsdp, trainer.devices=<GPUs visible>) on cls in both precisions, all at once on the GPU(s):
#      each run's final metrics line, whether it reached its last step, and the overflow / skipped-step lines and
#      loss-scale keys its logs show (16-mixed);
#   3. throughput and MFU of pixelformer's PiT backbone vs timm's VisionTransformer of the same shape at 784, 1,024
#      and 4,096 tokens (benchmarks/gpu_mfu.py), alone on the GPU once training has finished.
# Outputs, in $OUT when set, else benchmarks/results/gpu_check/ (5 files): gpu_check.log (this console), env.txt
# (nvidia-smi, pip list, torch build config), logs.txt (every run's full output), mfu.json, summary.json.
# Run directories (checkpoints) go to a temporary folder, removed at the end (GPU_CHECK_KEEP=1 keeps it).
#
# Knobs (environment; GPU defaults, smoke defaults differ): PYTHON (default: .venv/bin/python, python3 or python,
# the first that imports torch), GPU_CHECK_STEPS (300), GPU_CHECK_FSDP_STEPS (100), GPU_CHECK_MODEL (pit_tiny),
# GPU_CHECK_IMG (16: digits resized to 16x16 = 256 pixel tokens), GPU_CHECK_TASKS ("cls mae dit"),
# GPU_CHECK_PRECISIONS ("bf16-mixed 16-mixed"), GPU_CHECK_FSDP_PRECISIONS ("bf16-mixed 16-mixed"; smoke "32-true";
# empty skips FSDP), GPU_CHECK_PARALLEL (8 training processes at once), GPU_CHECK_TRAIN_BUDGET (140 s for all the
# training), GPU_CHECK_MFU_TIMEOUT (120 s), GPU_CHECK_MFU_ARGS (gpu_mfu.py's arguments), GPU_CHECK_TRAIN_EXTRA (more
# key=value overrides for every training run).
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 2
SMOKE="${GPU_CHECK_SMOKE:-0}"
OUT_DIR="${OUT:-$REPO/benchmarks/results/gpu_check}"
mkdir -p "$OUT_DIR"

if [ "$SMOKE" = 1 ]; then  # CPU, seconds per run: checks the script, not the GPU
  STEPS="${GPU_CHECK_STEPS:-4}"; FSDP_STEPS="${GPU_CHECK_FSDP_STEPS:-4}"; MODEL="${GPU_CHECK_MODEL:-pit_mini}"
  IMG="${GPU_CHECK_IMG:-8}"; PARALLEL="${GPU_CHECK_PARALLEL:-2}"; TRAIN_BUDGET="${GPU_CHECK_TRAIN_BUDGET:-240}"
  ACCEL=cpu; LOG_EVERY=2; FSDP_PRECISIONS="${GPU_CHECK_FSDP_PRECISIONS-32-true}"  # FSDP on CPU: full precision only
  MFU_ARGS="${GPU_CHECK_MFU_ARGS:---device cpu --models pit_tiny --tokens 64 --steps 2 --warmup 1 --batch 2 --depth 2}"
  MFU_ARGS="$MFU_ARGS --matmul-size 512"
else
  STEPS="${GPU_CHECK_STEPS:-300}"; FSDP_STEPS="${GPU_CHECK_FSDP_STEPS:-100}"; MODEL="${GPU_CHECK_MODEL:-pit_tiny}"
  IMG="${GPU_CHECK_IMG:-16}"; PARALLEL="${GPU_CHECK_PARALLEL:-8}"; TRAIN_BUDGET="${GPU_CHECK_TRAIN_BUDGET:-140}"
  ACCEL=gpu; LOG_EVERY=50; FSDP_PRECISIONS="${GPU_CHECK_FSDP_PRECISIONS-bf16-mixed 16-mixed}"
  MFU_ARGS="${GPU_CHECK_MFU_ARGS:---device cuda --models pit_tiny pit_small --tokens 784 1024 4096}"
fi
TASKS="${GPU_CHECK_TASKS:-cls mae dit}"
PRECISIONS="${GPU_CHECK_PRECISIONS:-bf16-mixed 16-mixed}"
MFU_TIMEOUT="${GPU_CHECK_MFU_TIMEOUT:-120}"
TRAIN_EXTRA="${GPU_CHECK_TRAIN_EXTRA:-}"

export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export WANDB_MODE=disabled WANDB_SILENT=true HF_HUB_OFFLINE=1 MPLBACKEND=Agg PYTHONUNBUFFERED=1

WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
PARTS="$WORK/parts.tsv"  # part <TAB> status <TAB> seconds <TAB> note
LOGS="$OUT_DIR/logs.txt"
T_START=$(date +%s)

section() { printf '\n==== %s ====\n' "$*"; }
now() { date +%s; }
one_line() { tr '\n\t' '  ' | cut -c1-"${1:-300}"; }
record() {  # part status seconds note
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$(printf '%s' "$4" | one_line 400)" >>"$PARTS"
  printf '[%s] %s (%ss) %s\n' "$2" "$1" "$3" "$4"
}
tail_of() {  # the last non-empty lines of a file, indented: an error's message
  grep -v '^[[:space:]]*$' "$1" 2>/dev/null | tail -n "${2:-6}" | cut -c1-300 | sed 's/^/      | /'
}

pick_python() {
  local c
  if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"; return; fi
  for c in "$REPO/.venv/bin/python" python3 python; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import torch' >/dev/null 2>&1; then echo "$c"; return; fi
  done
  command -v python3 >/dev/null 2>&1 && echo python3 || echo python
}

# ------------------------------------------------------------------------------------------------------- header
header() {
  local t0; t0=$(now)
  section "header"
  echo "date $(date -u '+%Y-%m-%d %H:%M:%S UTC'), host $(hostname 2>/dev/null || cat /etc/hostname), $(nproc) CPUs, smoke=$SMOKE"
  echo "repo $REPO at $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '(no git)')" \
       "($(git -C "$REPO" status --short 2>/dev/null | wc -l) changed files); outputs in $OUT_DIR"
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=index,name,driver_version,memory.total,compute_mode,power.limit,clocks.max.sm \
      --format=csv,noheader 2>&1 | sed 's/^/gpu: /'
    nvidia-smi 2>/dev/null | grep -o 'CUDA Version: [0-9.]*' | head -1 | sed 's/^/driver /'
    if nvidia-smi --query-gpu=compute_mode --format=csv,noheader 2>/dev/null | grep -qi exclusive; then
      echo "note: a GPU is in an exclusive compute mode: training runs one process at a time"
      PARALLEL=1
    fi
  else
    echo "nvidia-smi: not found"
  fi
  PY="$(pick_python)"
  { echo "# nvidia-smi"; nvidia-smi 2>&1; nvidia-smi topo -m 2>&1
    echo "# python: $PY"; "$PY" -m pip list --format=freeze 2>&1 \
      | grep -iE '^(torch|lightning|timm|diffusers|omegaconf|numpy|triton|nvidia|scikit|torchmetrics|wandb|matplotlib)'
    echo "# torch build"; "$PY" -c 'import torch; print(torch.__config__.show())' 2>&1
    echo "# CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-unset}"; free -g 2>&1; df -h "$WORK" 2>&1
  } >"$OUT_DIR/env.txt" 2>&1
  local versions rc
  versions="$("$PY" - <<'EOF' 2>&1
import importlib, sys
core = ["torch", "lightning", "timm", "diffusers", "omegaconf"]
other = ["torchvision", "torchmetrics", "sklearn", "numpy", "tqdm", "matplotlib", "wandb"]
missing, found = [], []
for name in core + other:
    try:
        found.append(f"{name} {getattr(importlib.import_module(name), '__version__', '?')}")
    except Exception as e:  # noqa: BLE001 - any import failure is "missing" here
        missing.append(name)
        found.append(f"{name} MISSING ({type(e).__name__}: {str(e)[:80]})")
print(f"python {sys.version.split()[0]} ({sys.executable})")
print("; ".join(found))
if "torch" not in missing:
    import torch
    cuda = torch.cuda.is_available()
    names = [f"{torch.cuda.get_device_name(i)} (sm {'.'.join(map(str, torch.cuda.get_device_capability(i)))})"
             for i in range(torch.cuda.device_count())] if cuda else []
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    print(f"torch {torch.__version__}: CUDA {torch.version.cuda}, cuDNN {cudnn}, cuda available {cuda}, "
          f"{torch.cuda.device_count() if cuda else 0} device(s) {names}, "
          f"bf16 {torch.cuda.is_bf16_supported() if cuda else 'n/a'}")
    print(f"NGPU={torch.cuda.device_count() if cuda else 0}")
print("core missing: " + (", ".join(m for m in core if m in missing) or "none")
      + "; other missing: " + (", ".join(m for m in other if m in missing) or "none"))
sys.exit(1 if any(m in missing for m in core) else 0)
EOF
)"; rc=$?
  echo "$versions" | grep -v '^NGPU='
  NGPU="$(echo "$versions" | sed -n 's/^NGPU=//p')"; NGPU="${NGPU:-0}"
  if [ "$rc" -ne 0 ]; then
    record "imports" FAIL "$(( $(now) - t0 ))" \
      "$(echo "$versions" | grep '^core missing' || echo "$versions" | tail -n 2)"
  else
    record "imports" PASS "$(( $(now) - t0 ))" "torch, lightning, timm, diffusers, omegaconf import ($PY)"
  fi
  local err
  if err="$("$PY" -c 'import pixelformer, pixelformer.engine, pixelformer.tasks' 2>&1)"; then
    PIXELFORMER_OK=1
  else
    PIXELFORMER_OK=0
    PIXELFORMER_ERR="$(echo "$err" | tail -n 1)"
    record "import pixelformer" FAIL 0 "$(echo "$err" | tail -n 1)"
    echo "$err" | tail -n 6 | sed 's/^/      | /'
  fi
  if [ "$SMOKE" != 1 ] && [ "$NGPU" -eq 0 ]; then
    record "cuda" FAIL 0 "torch sees no CUDA device: the GPU parts will fail"
  fi
}

# ----------------------------------------------------------------------------------------------------- training
declare -a RUN_NAMES=() PIDS=()
declare -A RUN_ARGS=() RUN_KIND=() RUN_STEPS=() RUN_PORT=()

running() { local n=0 p; for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null && n=$((n + 1)); done; echo "$n"; }

launch() {  # name master_port overrides...: one tools/train.py run in the background, bounded by the phase's deadline
  local name=$1 port=$2; shift 2
  local budget=$(( PHASE_END - $(now) ))
  [ "$budget" -lt 10 ] && budget=10
  (
    start=$(now)
    [ -n "$port" ] && export MASTER_PORT="$port"
    OMP_NUM_THREADS="$THREADS" timeout -k 10 "$budget" "$PY" tools/train.py "$@" "run.dir=$WORK/runs/$name" \
      >"$WORK/$name.log" 2>&1
    echo "$? $(( $(now) - start ))" >"$WORK/$name.rc"
  ) &
  PIDS+=("$!")
}

run_facts() {  # run_dir steps: whether eval.json records the last step; skip / overflow / scaler keys of metrics.jsonl
  "$PY" - "$1" "$2" <<'EOF' 2>&1
import json, re, sys
from pathlib import Path
run, want = Path(sys.argv[1]), int(sys.argv[2])
facts = []
try:
    step = json.loads((run / "eval.json").read_text()).get("step")
    facts.append(f"step {step}/{want}" + (" done" if step == want else " (did NOT reach the last step)"))
except (OSError, ValueError):
    facts.append("not finished (no eval.json)")
last = {}
try:
    for line in (run / "metrics.jsonl").read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        last.update({k: v for k, v in record.items() if re.search(r"skip|overflow|scale|finite", k, re.I)})
except OSError:
    pass
if last:
    facts.append("metrics.jsonl: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                               for k, v in last.items()))
print("; ".join(facts))
EOF
}

report_run() {  # name
  local name=$1 log="$WORK/$1.log" rc secs status final last skips facts note
  read -r rc secs <"$WORK/$name.rc" 2>/dev/null || { rc=255; secs=?; }
  final="$(grep -E '^final step' "$log" 2>/dev/null | tail -n 1)"
  last="$(grep -E '^step [0-9]+/' "$log" 2>/dev/null | tail -n 1 | sed 's/ elapsed.*//')"
  # Indented lines are the config dump (skip_nonfinite_steps: ...), not messages.
  skips="$(grep -v '^[[:space:]]' "$log" 2>/dev/null | grep -ciE 'overflow|skipped|non-finite|nan/inf|inf/nan' || true)"
  facts="$(run_facts "$WORK/runs/$name" "${RUN_STEPS[$name]}")"
  if [ "$rc" = 0 ] && [ -n "$final" ]; then status=PASS
  elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then status=TIMEOUT
  elif [ "${RUN_KIND[$name]}" = fsdp ] && [ "$NGPU" -eq 0 ] \
       && grep -qE 'FSDP is only available on GPU|on the CPU runs in full precision only' "$log"; then
    status=XFAIL  # a refusal of FSDP on a CPU-only machine (smoke test): expected
  else status=FAIL; fi
  note="$facts; overflow/skip log lines: $skips; ${final:-no final metrics line}"
  if [ "$status" = FAIL ] || [ "$status" = TIMEOUT ]; then
    note="$(grep -v '^[[:space:]]*$' "$log" 2>/dev/null | tail -n 1 | cut -c1-200)"  # the error's message
    note="$note; $facts; overflow/skip log lines: $skips"
  fi
  [ "$status" = XFAIL ] && note="FSDP refused on this CPU-only machine, as expected: $(tail -n 1 "$log" | cut -c1-200)"
  record "train $name" "$status" "$secs" "$note"
  [ -n "$last" ] && echo "      last log line: $last"
  if [ "$skips" != 0 ]; then
    grep -v '^[[:space:]]' "$log" | grep -iE 'overflow|skipped|non-finite|nan/inf|inf/nan' | head -n 3 \
      | cut -c1-240 | sed 's/^/      > /'
  fi
  if [ "$status" = FAIL ] || [ "$status" = TIMEOUT ]; then tail_of "$log" 6; fi
  { echo "===== train $name: rc $rc, ${secs}s, $PY tools/train.py ${RUN_ARGS[$name]} run.dir=..."; cat "$log"; echo
  } >>"$LOGS" 2>/dev/null
}

add_run() {  # name kind steps port overrides
  local name=$1 kind=$2 steps=$3 port=$4; shift 4
  RUN_NAMES+=("$name"); RUN_KIND[$name]=$kind; RUN_STEPS[$name]=$steps; RUN_ARGS[$name]="$*"
  RUN_PORT[$name]=$port
}

training() {
  section "training: [$TASKS] x [$PRECISIONS], FSDP [$FSDP_PRECISIONS]: $MODEL, digits ${IMG}x${IMG}, $STEPS steps"
  : >"$LOGS"
  local common=(data=digits "model=$MODEL" "trainer.accelerator=$ACCEL" "trainer.log_every_steps=$LOG_EVERY"
                trainer.progress_bar=false logger=disabled)
  [ "$IMG" != 8 ] && common+=("data.img_size=$IMG")
  # shellcheck disable=SC2206  # intended word splitting of key=value overrides
  common+=($TRAIN_EXTRA)
  local task prec port=29531 fsdp=(trainer.strategy=fsdp) devices=$(( NGPU > 0 ? NGPU : 1 ))
  [ -f pixelformer/configs/trainer/fsdp.yaml ] && fsdp=(trainer=fsdp trainer.strategy=fsdp)  # its group, if one exists
  for task in $TASKS; do
    for prec in $PRECISIONS; do
      add_run "$task-$prec" single "$STEPS" "" "task=$task" "${common[@]}" "trainer.precision=$prec" \
        trainer.devices=1 "trainer.max_steps=$STEPS"
    done
  done
  for prec in $FSDP_PRECISIONS; do
    add_run "fsdp-cls-$prec" fsdp "$FSDP_STEPS" "$port" task=cls "${common[@]}" "${fsdp[@]}" \
      "trainer.devices=$devices" "trainer.precision=$prec" "trainer.max_steps=$FSDP_STEPS"
    port=$((port + 1))
  done
  if [ "$PIXELFORMER_OK" != 1 ]; then
    local name
    for name in "${RUN_NAMES[@]}"; do
      record "train $name" FAIL 0 "not run: pixelformer does not import: $PIXELFORMER_ERR"
    done
    return
  fi
  THREADS=$(( $(nproc) / PARALLEL )); [ "$THREADS" -lt 1 ] && THREADS=1
  PHASE_END=$(( $(now) + TRAIN_BUDGET ))
  echo "${#RUN_NAMES[@]} runs, $PARALLEL at a time, $THREADS CPU threads each, all done within ${TRAIN_BUDGET}s"
  local name
  for name in "${RUN_NAMES[@]}"; do
    while [ "$(running)" -ge "$PARALLEL" ]; do sleep 1; done
    # shellcheck disable=SC2086  # the overrides have no spaces
    launch "$name" "${RUN_PORT[$name]}" ${RUN_ARGS[$name]}
  done
  wait
  for name in "${RUN_NAMES[@]}"; do report_run "$name"; done
}

# ---------------------------------------------------------------------------------------------------------- MFU
mfu() {
  section "throughput and MFU: pixelformer PiT vs timm VisionTransformer, bf16 autocast (benchmarks/gpu_mfu.py)"
  local t0 rc; t0=$(now)
  rm -f "$OUT_DIR/mfu.json"  # no stale table from an earlier run in the same folder
  # shellcheck disable=SC2086  # MFU_ARGS is a list of arguments
  timeout -k 10 "$MFU_TIMEOUT" "$PY" benchmarks/gpu_mfu.py $MFU_ARGS --out "$OUT_DIR/mfu.json" 2>"$WORK/mfu.err"
  rc=$?
  { echo "===== gpu_mfu.py stderr (rc $rc)"; cat "$WORK/mfu.err"; } >>"$LOGS"
  case "$rc" in
    0) record "mfu" PASS "$(( $(now) - t0 ))" "table above; $OUT_DIR/mfu.json" ;;
    124|137) record "mfu" TIMEOUT "$(( $(now) - t0 ))" "killed after ${MFU_TIMEOUT}s; mfu.json keeps the rows done"
             tail_of "$WORK/mfu.err" 6 ;;
    1) record "mfu" FAIL "$(( $(now) - t0 ))" "some rows failed (their errors: the table above, mfu.json, logs.txt)"
       tail_of "$WORK/mfu.err" 6 ;;
    *) record "mfu" FAIL "$(( $(now) - t0 ))" "gpu_mfu.py exited $rc: $(tail -n 1 "$WORK/mfu.err")"
       tail_of "$WORK/mfu.err" 8 ;;
  esac
}

# ------------------------------------------------------------------------------------------------------ summary
summary() {
  local elapsed=$(( $(now) - T_START ))
  section "SUMMARY ($elapsed s; outputs in $OUT_DIR)"
  awk -F'\t' '{ printf "%-8s %-26s %5ss  %s\n", $2, $1, $3, substr($4, 1, 170) }' "$PARTS"
  "$PY" - "$PARTS" "$OUT_DIR/summary.json" "$elapsed" "$SMOKE" <<'EOF' 2>/dev/null || echo "(no summary.json: no python)"
import json, sys
parts_file, out, elapsed, smoke = sys.argv[1:5]
parts = []
for line in open(parts_file):
    part, status, seconds, note = (line.rstrip("\n").split("\t") + [""] * 4)[:4]
    parts.append({"part": part, "status": status, "seconds": seconds, "note": note})
json.dump({"elapsed_s": int(elapsed), "smoke": smoke == "1", "parts": parts}, open(out, "w"), indent=2)
EOF
  local failed; failed=$(awk -F'\t' '$2 == "FAIL" || $2 == "TIMEOUT"' "$PARTS" | wc -l)
  if [ "$failed" -gt 0 ]; then echo "RESULT: $failed part(s) failed or timed out"; return 1; fi
  echo "RESULT: all parts passed"
}

main() {
  [ "${GPU_CHECK_KEEP:-0}" = 1 ] || trap 'rm -rf "$WORK"' EXIT
  : >"$PARTS"
  PIXELFORMER_OK=0; PIXELFORMER_ERR=""; NGPU=0
  header
  training
  mfu
  summary
}

main 2>&1 | tee "$OUT_DIR/gpu_check.log"
exit "${PIPESTATUS[0]}"
