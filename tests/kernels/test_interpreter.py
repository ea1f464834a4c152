"""Runs every ``interpreted/*_cases.py`` in its own process with TRITON_INTERPRET=1 and
MOLM_DS_KERNELS=triton (the Triton kernels on CPU tensors), so the interpreter never touches this
session. A failing case fails its file's test here, with the inner report."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CASES = sorted((HERE / "interpreted").glob("*_cases.py"))


def test_case_files_exist():
    assert {p.name for p in CASES} >= {"grouped_gemm_cases.py", "stickbreaking_cases.py", "layers_cases.py"}


@pytest.mark.parametrize("path", CASES, ids=lambda p: p.stem)
def test_interpreted(path):
    env = dict(os.environ, TRITON_INTERPRET="1", MOLM_DS_KERNELS="triton", DS_ACCELERATOR="cpu",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", str(path)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"{path.name} under the interpreter:\n{out.stdout[-6000:]}\n{out.stderr[-2000:]}"
    assert " passed" in out.stdout and " skipped" not in out.stdout, out.stdout[-2000:]
