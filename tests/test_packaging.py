"""The package as pip installs it: every package directory is listed in pyproject.toml, the licence is
an SPDX string (no setuptools warning), and the console scripts run from an installed copy outside the
checkout (launch/ as molm_ds.launch, the shipped configs beside it)."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SCRIPTS = PYPROJECT["project"]["scripts"]


def test_every_package_is_listed():
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    found = {".".join(p.relative_to(REPO).parent.parts) for top in ("molm_ds", "kernels", "data_prep")
             for p in (REPO / top).rglob("__init__.py")}
    assert found <= listed, f"add to [tool.setuptools] packages: {sorted(found - listed)}"
    assert PYPROJECT["project"]["license"] == "Apache-2.0"


@pytest.mark.slow
def test_console_scripts_from_an_installed_copy(tmp_path):
    target = tmp_path / "site"
    p = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--target",
                        str(target), str(REPO)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "warning" not in (p.stdout + p.stderr).lower().replace("location", ""), p.stdout + p.stderr
    env = dict(os.environ, PYTHONPATH=str(target), DS_ACCELERATOR="cpu")
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    # the lm-evaluation-harness task the README names travels with the package
    assert (target / "molm_ds" / "shipped" / "configs" / "lm_eval" / "molm_embedded_code.yaml").is_file()
    for name, where in SCRIPTS.items():
        assert (target / "bin" / name).is_file(), name
        r = subprocess.run([str(target / "bin" / name), "--help"], cwd=cwd, env=env, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, (name, r.stderr[-2000:])
        assert ("usage:" in r.stdout) or (name == "molm-prepare-data" and "molm-prepare-data embedded" in r.stdout), name
    code = ("import molm_ds, molm_ds.launch.evaluate as e; from molm_ds.train.job import load_job; "
            "j = load_job('configs/demo.yaml'); print(molm_ds.__file__); print(e.__file__); print(j.deepspeed.resolved_path())")
    r = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert all(line.startswith(str(target)) for line in r.stdout.split()), r.stdout
    r = subprocess.run([str(target / "bin" / "molm-eval"), "--checkpoint", "nope", "--data", "nope"], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: ")
