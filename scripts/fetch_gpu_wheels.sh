#!/usr/bin/env bash
# Wheels for scripts/gpu_check.sh: what the GPU machine lacks, fetched here into the git-ignored .whl/
# (the device tool carries it with `carry: [".whl"]`; gpu_check.sh installs it into /tmp/site there).
# That machine: Python 3.12, x86-64, torch 2.11+cu130, triton 3.6, pytest-xdist, no registry access, and
# no deepspeed or pydantic; everything else molm-ds imports to train is already there (docs/kernels.md,
# "The GPU check"). Pins are the versions this checkout is tested with, one version of each.
#
#   bash scripts/fetch_gpu_wheels.sh [PYTHON]      # PYTHON: any Python 3 with pip (default python3)
#
# The set is verified before anything is sent: exactly the wheels below, nothing else in .whl/, and the
# wheels plus the tracked files of the checkout under the device tool's 64 MiB carry limit. Exit 1 with
# one line saying what is wrong otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-${PYTHON:-python3}}"
DEST=.whl
LIMIT_BYTES=$((64 * 1024 * 1024))
BINARY=(pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
        typing-extensions==4.16.0 hjson==3.1.0)
DEEPSPEED=deepspeed==0.19.8
mkdir -p "$DEST"

"$PY" -m pip --version > /dev/null 2>&1 || { echo "error: $PY has no pip: pass a Python with pip (bash $0 PYTHON)"; exit 1; }

# Binary wheels for the device's Python, as the device README says (pip matches the manylinux tags exactly).
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "${BINARY[@]}"

# DeepSpeed is published as an sdist only: build its pure-Python wheel (no compiled ops: molm-ds uses
# none) in pip's isolated build environment, so neither the wheel package nor torch has to be installed
# in $PY (its setup.py builds without torch when DS_BUILD_OPS=0).
if ! compgen -G "$DEST/deepspeed-0.19.8-*.whl" > /dev/null; then
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  "$PY" -m pip download -q --no-deps --no-binary=:all: -d "$tmp" "$DEEPSPEED"
  DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps -w "$DEST" "$tmp"/deepspeed-0.19.8.tar.gz
fi

# Verify the set: one wheel per pin, nothing else, and the size of what the device call will carry.
want=$(( ${#BINARY[@]} + 1 ))
for spec in "${BINARY[@]}" "$DEEPSPEED"; do
  name="${spec%%==*}"; version="${spec##*==}"
  file_name="$(echo "$name" | tr - _)-$version-"
  n=$(find "$DEST" -maxdepth 1 -name "${file_name}*.whl" | wc -l)
  [ "$n" -eq 1 ] || { echo "error: $DEST holds $n wheels for $spec (want 1): rm -rf $DEST and run again"; exit 1; }
done
have=$(find "$DEST" -maxdepth 1 -type f | wc -l)
[ "$have" -eq "$want" ] || { echo "error: $DEST holds $have files, want the $want wheels above: rm -rf $DEST and run again"; exit 1; }
wheel_bytes=$(find "$DEST" -maxdepth 1 -type f -printf '%s\n' | awk '{s += $1} END {print s + 0}')
tree_bytes=$( (git ls-files -z --cached --others --exclude-standard 2>/dev/null || true) | xargs -0 -r stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
total=$((wheel_bytes + tree_bytes))
ls -1 "$DEST"
echo "wheels: $have files, $((wheel_bytes / 1024)) KiB; with the checkout's files $((total / 1024)) KiB of the $((LIMIT_BYTES / 1024)) KiB carry limit"
[ "$total" -lt "$LIMIT_BYTES" ] || { echo "error: the wheels and the checkout are $total bytes, over the 64 MiB the device tool carries"; exit 1; }
