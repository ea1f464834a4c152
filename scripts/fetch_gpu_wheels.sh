#!/usr/bin/env bash
# Wheels for scripts/gpu_check.sh: what the GPU machine lacks, downloaded here into the git-ignored .whl/
# (the device tool carries it with `carry: [".whl"]`; gpu_check.sh installs it into /tmp/site there).
# That machine: Python 3.12, x86-64, torch 2.11+cu130, triton 3.6, no registry access, and no deepspeed or
# pydantic; everything else molm-ds imports to train is already there (docs/kernels.md, "GPU check").
# Pins are the versions this checkout is tested with, one version of each.
#
#   bash scripts/fetch_gpu_wheels.sh [PYTHON]      # PYTHON: one with pip (and torch, to build DeepSpeed's wheel)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-${PYTHON:-python3}}"
DEST=.whl
mkdir -p "$DEST"

# Binary wheels for the device's Python, as the device README says (pip matches the manylinux tags exactly).
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" \
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  typing-extensions==4.16.0 hjson==3.1.0

# DeepSpeed is published as an sdist only: build its pure-Python wheel (no compiled ops; molm-ds uses none
# on the GPU) against the torch of $PY, without build isolation (its setup.py imports torch).
if ! compgen -G "$DEST/deepspeed-0.19.8-*.whl" > /dev/null; then
  tmp="$(mktemp -d)"
  "$PY" -m pip download --no-deps --no-binary=:all: -d "$tmp" deepspeed==0.19.8
  DS_BUILD_OPS=0 "$PY" -m pip wheel --no-deps --no-build-isolation -w "$DEST" "$tmp"/deepspeed-0.19.8.tar.gz
  rm -rf "$tmp"
fi
ls -1 "$DEST"
du -sh "$DEST"
