"""scripts/gpu_check.sh runs end to end before any GPU is lent: every part at tiny shapes on the CPU
(--cpu-smoke; the Triton kernels under the interpreter), one JSON file and the log in $OUT. The merge's
verdicts against the issue's targets are checked on hand-made part files (no timing is asserted)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"
PARTS = ("env", "warm", "kernels", "hang", "bench", "train", "pytest")


def _py(*args, **kw):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT, **kw)


def _write(path, data):
    Path(path).write_text(json.dumps(data))


def test_merge_judges_the_targets_and_marks_missing_parts(tmp_path):
    parts = tmp_path / "parts"
    parts.mkdir()
    _write(parts / "env.json", {"part": "env", "status": "ok", "device": "NVIDIA H200", "checks": {}})
    _write(parts / "bench.json", {"part": "bench", "status": "ok", "checks": {
        "stickbreaking_fwd_bwd_heads16_d64": {"ours_over_sdpa_random": 1.1},
        "moe_mlp_layer_fwd_bwd": {"fraction_of_dense": 0.8}}})
    _write(parts / "train.json", {"part": "train", "status": "ok", "checks": {"train": {"mfu_vs_datasheet": 0.41}}})
    assert _py("mark", "--out", str(parts / "hang.json"), "--name", "hang", "--rc", "124").returncode == 0
    assert _py("mark", "--out", str(parts / "kernels.json"), "--name", "kernels", "--rc", "125").returncode == 0
    out = tmp_path / "gpu_check.json"
    assert _py("merge", "--parts", str(parts), "--out", str(out)).returncode == 0
    s = json.loads(out.read_text())["summary"]
    assert s["status"] == {"env": "ok", "warm": "missing", "pytest": "missing", "kernels": "skipped", "hang": "timeout",
                           "bench": "ok", "train": "ok"}
    t = s["targets"]
    assert t["stickbreaking_fwd_bwd_over_sdpa_flash_T4096_random"]["met"] is True
    assert t["moe_mlp_layer_fraction_of_dense"]["met"] is False
    assert t["training_mfu"]["met"] is False  # 0.41 < 0.45
    assert t["no_hang_in_50_runs"]["met"] is False  # killed at its time limit
    # a rerun of some parts: the others are "not selected", not "missing"
    assert _py("merge", "--parts", str(parts), "--selected", "train pytest", "--out", str(out)).returncode == 0
    s = json.loads(out.read_text())["summary"]
    assert s["status"]["warm"] == "not selected" and s["status"]["pytest"] == "missing" and s["status"]["train"] == "ok"


def test_a_failing_check_is_recorded_and_the_next_one_runs(tmp_path):
    pytest.importorskip("torch")
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    gpu_check._import_torch()
    rep = gpu_check.Report(str(tmp_path / "p.json"), "kernels", smoke=True)
    with rep.trying("first"):
        raise RuntimeError("CUDA out of memory")
    with rep.trying("second"):
        rep.check("second", ok=True)
    rep.done()
    data = json.loads((tmp_path / "p.json").read_text())
    assert data["checks"]["first"]["ok"] is False and "out of memory" in data["checks"]["first"]["error"]
    assert data["checks"]["second"]["ok"] is True
    assert data["status"] == "failed" and data["failed"] == ["first"]


def test_the_shell_script_stops_at_once_on_a_broken_environment(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=sys.executable, GPU_CHECK_PARTS="train banana")
    run = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 2 and "error: GPU_CHECK_PARTS names 'banana'" in run.stdout
    # a Python that cannot import the trainer (here: one told that deepspeed is absent) ends the check at once
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\nexec {sys.executable} -c 'import sys; sys.modules[\"deepspeed\"] = None; "
                    f"sys.argv = sys.argv[1:]; exec(sys.argv[1]) if sys.argv[0] == \"-c\" else None' \"$@\"\n")
    fake.chmod(0o755)
    env = dict(os.environ, OUT=str(tmp_path / "out2"), PYTHON=str(fake))
    run = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 3, run.stdout[-2000:]
    assert "error: deepspeed, pydantic or molm_ds.train does not import" in run.stdout
    assert "== env" not in run.stdout  # nothing ran after it


def test_refuses_to_run_without_a_gpu_unless_smoke(tmp_path):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    out = _py("env", "--out", str(tmp_path / "env.json"), env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 2 and "--cpu-smoke" in out.stderr


@pytest.mark.slow
def test_cpu_smoke_run_writes_one_json_and_the_log(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=sys.executable, DS_ACCELERATOR="cpu")
    env.pop("MOLM_DS_KERNELS", None)
    run = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--cpu-smoke"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["gpu_check.json", "gpu_check.log"], files  # what comes back from a device run
    result = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert result["summary"]["status"] == {p: "ok" for p in PARTS}, result["summary"]
    parts = result["parts"]
    assert parts["kernels"]["failed"] == [] and len(parts["kernels"]["checks"]) >= 9
    assert parts["warm"]["failed"] == [] and {f"warm_{n}" for n in ("kernels_mlp", "kernels_stickbreaking", "kernels_block",
                                                                     "train_block", "hang", "bench")} == set(parts["warm"]["checks"])
    assert parts["hang"]["checks"]["hang_shape"]["bitwise_identical_to_first"] is True
    assert parts["train"]["checks"]["train"]["steps"] == 3
    assert {"mlp_expert_gemms_fwd_bwd", "moe_mlp_layer_fwd_bwd", "stickbreaking_fwd_bwd_heads16_d64"} <= set(parts["bench"]["checks"])
    assert "== gpu_check done" in (tmp_path / "out" / "gpu_check.log").read_text()
