#!/usr/bin/env bash
# The one prepared GPU check, under 420 s on one H100 or H200 (device tool: timeout_s 480). Installs what
# the GPU machine lacks from the wheels in .whl/, stops at once if molm-ds cannot import its trainer, then
# runs the parts of scripts/gpu_check.py, each in its own process under a time limit:
#
#   env      device, versions, the card's bf16 matmul and copy ceilings
#   warm     compiles every Triton kernel variant the later parts launch, in parallel processes
#   kernels  every kernel vs its reference in bf16 at the MoLM-350M-4B layer shape; bitwise-repeatable backward
#   hang     upstream's hang shape, 50 runs
#   bench    MoE MLP vs dense GEMM, stick-breaking vs SDPA flash at T 4096
#   train    steps of the 350M-4B layer shape through launch/pretrain.py (layers sized to the card's memory)
#   pytest   `pytest -m gpu` (kernels, ops, model, and the CUDA training test), with its own time budget
#
# After every part the merged result is rewritten in $OUT/gpu_check.json (runs/gpu_check without $OUT),
# beside $OUT/gpu_check.log: a kill at any moment keeps every finished part. A check that fails inside a
# part is recorded and the next check runs.
#
#   bash scripts/fetch_gpu_wheels.sh                        # here, once (fills and verifies the git-ignored .whl/)
#   bash scripts/gpu_check.sh                               # on the GPU machine (device tool: carry [".whl"])
#   GPU_CHECK_PARTS="train pytest" bash scripts/gpu_check.sh   # rerun some parts only
#   bash scripts/gpu_check.sh --cpu-smoke                   # every part at tiny shapes on the CPU (tests/test_gpu_check_smoke.py)
#
# GPU_CHECK_BUDGET_S (default 420; 2400 for the smoke run, whose limits are 6 times longer) caps the whole run; each part gets at most its own limit and what is
# left after the floors of the parts still to come (the pytest part keeps its own).
set -uo pipefail
cd "$(dirname "$0")/.."
SMOKE=""
[ "${1:-}" = "--cpu-smoke" ] && SMOKE="--cpu-smoke"
OUT_DIR="${OUT:-runs/gpu_check}"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_check.log"
: > "$LOG"
exec > >(tee -a "$LOG") 2>&1
PARTS_DIR="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_work.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
T0=$(date +%s)
BUDGET="${GPU_CHECK_BUDGET_S:-420}"
SCALE=1  # the smoke run's interpreter on a small shared CPU is slow; its limits only guard against hangs
[ -n "$SMOKE" ] && { BUDGET="${GPU_CHECK_BUDGET_S:-2400}"; SCALE=6; }
ALL_PARTS="env warm kernels hang bench train pytest"
SELECTED="${GPU_CHECK_PARTS:-$ALL_PARTS}"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$WORK/triton_cache}"  # shared by the warm part and the parts after it
[ -n "$SMOKE" ] && export DS_ACCELERATOR=cpu

for p in $SELECTED; do
  case " $ALL_PARTS " in *" $p "*) ;; *) echo "error: GPU_CHECK_PARTS names '$p'; parts are: $ALL_PARTS"; exit 2 ;; esac
done

echo "== gpu_check ${SMOKE:-(GPU)} $(date -u +%FT%TZ) in $PWD; parts: $SELECTED"
if [ -z "$SMOKE" ] && compgen -G ".whl/*.whl" > /dev/null; then  # (the smoke run uses the local environment)
  echo "== installing $(ls .whl/*.whl | wc -l) wheels from .whl/ into /tmp/site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "error: the wheels in .whl/ do not install: run scripts/fetch_gpu_wheels.sh again"; exit 3; }
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
"$PY" -c "import deepspeed, pydantic, molm_ds.train; print('imports: deepspeed', deepspeed.__version__, 'pydantic', pydantic.VERSION)" \
  || { echo "error: deepspeed, pydantic or molm_ds.train does not import: run scripts/fetch_gpu_wheels.sh here and carry .whl"; exit 3; }
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv

floor() {  # seconds a part keeps for itself against the parts before it
  case $1 in pytest) echo $(( 60 * SCALE )) ;; train) echo $(( 60 * SCALE )) ;; *) echo $(( 20 * SCALE )) ;; esac
}

publish() {  # the merged result of every part so far, into $OUT_DIR
  "$PY" scripts/gpu_check.py merge --parts "$PARTS_DIR" --selected "$SELECTED" --out "$OUT_DIR/gpu_check.json" > /dev/null
}

part() {  # part NAME LIMIT_S ARGS...: scripts/gpu_check.py NAME ARGS under min(LIMIT_S, what is left)
  local name=$1 limit=$(( $2 * SCALE ))
  shift 2
  case " $SELECTED " in *" $name "*) ;; *) return ;; esac
  local later=0 seen=0 p
  for p in $SELECTED; do
    [ "$seen" = 1 ] && later=$(( later + $(floor "$p") ))
    [ "$p" = "$name" ] && seen=1
  done
  local left=$(( BUDGET - ($(date +%s) - T0) - later ))
  if [ "$left" -lt 15 ]; then
    echo "== $name: skipped, ${left}s of the budget left for it"
    "$PY" scripts/gpu_check.py mark --out "$PARTS_DIR/$name.json" --name "$name" --rc 125
    publish
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit}s; $(( $(date +%s) - T0 ))s elapsed)"
  local t=$(date +%s)
  GPU_CHECK_PART_LIMIT_S=$limit timeout --kill-after=5 "$limit" "$PY" scripts/gpu_check.py "$name" $SMOKE --out "$PARTS_DIR/$name.json" "$@"
  local rc=$?
  echo "== $name: exit $rc after $(( $(date +%s) - t ))s"
  "$PY" scripts/gpu_check.py mark --out "$PARTS_DIR/$name.json" --name "$name" --rc "$rc" --seconds "$(( $(date +%s) - t ))"
  publish
}

part env 30
part warm 90
part kernels 60
part hang 45
part bench 75
part train 150 --work "$WORK"
part pytest 120
publish
"$PY" scripts/gpu_check.py merge --parts "$PARTS_DIR" --selected "$SELECTED" --out "$OUT_DIR/gpu_check.json" | tail -n 40
echo "== gpu_check done in $(( $(date +%s) - T0 ))s: $OUT_DIR/gpu_check.json, $LOG"
rm -rf "$PARTS_DIR"
