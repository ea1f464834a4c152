#!/usr/bin/env bash
# The one prepared GPU check (issue 12), under 8 minutes on one H200: installs what the GPU machine lacks
# from the wheels in .whl/, then runs the parts of scripts/gpu_check.py (kernels against the
# references in bf16 at the MoLM-350M-4B layer shape, upstream's hang shape 50 times, benchmarks, 30
# training steps through launch/pretrain.py, `pytest -m gpu`), each in its own process under a time
# limit, and writes gpu_check.json (results + a summary against the targets) and gpu_check.log to $OUT
# (runs/gpu_check without it).
#
#   bash scripts/fetch_gpu_wheels.sh        # here, once, with network access (fills the git-ignored .whl/)
#   bash scripts/gpu_check.sh               # on the GPU machine (device tool: carry [".whl"])
#   bash scripts/gpu_check.sh --cpu-smoke   # the same parts at tiny shapes on the CPU (tests/test_gpu_check_smoke.py)
#
# GPU_CHECK_BUDGET_S (default 465) caps the whole run: a part gets at most its own limit and what is left.
set -uo pipefail
cd "$(dirname "$0")/.."
SMOKE=""
[ "${1:-}" = "--cpu-smoke" ] && SMOKE="--cpu-smoke"
OUT_DIR="${OUT:-runs/gpu_check}"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_check.log"
: > "$LOG"
exec > >(tee -a "$LOG") 2>&1
PARTS="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_work.XXXXXX")"
T0=$(date +%s)
BUDGET="${GPU_CHECK_BUDGET_S:-465}"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ -n "$SMOKE" ] && export DS_ACCELERATOR=cpu

echo "== gpu_check ${SMOKE:-(GPU)} $(date -u +%FT%TZ) in $PWD"
if compgen -G ".whl/*.whl" > /dev/null; then
  echo "== installing $(ls .whl/*.whl | wc -l) wheels from .whl/ into /tmp/site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || echo "wheel install failed"
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
"$PY" -c "import deepspeed, pydantic, molm_ds.train; print('imports: deepspeed', deepspeed.__version__, 'pydantic', pydantic.VERSION)" \
  || echo "molm_ds.train does not import: run scripts/fetch_gpu_wheels.sh here and carry .whl"
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv

part() {  # part NAME LIMIT_S ARGS...: scripts/gpu_check.py NAME ARGS under min(LIMIT_S, what is left)
  local name=$1 limit=$2
  shift 2
  local left=$(( BUDGET - ($(date +%s) - T0) ))
  if [ "$left" -lt 20 ]; then
    echo "== $name: skipped, ${left}s of the budget left"
    "$PY" scripts/gpu_check.py mark --out "$PARTS/$name.json" --name "$name" --rc 125
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit}s; $(( $(date +%s) - T0 ))s elapsed)"
  local t=$(date +%s)
  timeout --kill-after=5 "$limit" "$PY" scripts/gpu_check.py "$name" $SMOKE --out "$PARTS/$name.json" "$@"
  local rc=$?
  echo "== $name: exit $rc after $(( $(date +%s) - t ))s"
  "$PY" scripts/gpu_check.py mark --out "$PARTS/$name.json" --name "$name" --rc "$rc" --seconds "$(( $(date +%s) - t ))"
}

# the realistic shapes first; pytest last, when Triton's cache already holds most kernels
part env 30
part kernels 90
part hang 60
part bench 90
part train 150 --work "$WORK"
part pytest 120
"$PY" scripts/gpu_check.py merge --parts "$PARTS" --out "$OUT_DIR/gpu_check.json"
echo "== gpu_check done in $(( $(date +%s) - T0 ))s: $OUT_DIR/gpu_check.json, $LOG"
rm -rf "$WORK"
