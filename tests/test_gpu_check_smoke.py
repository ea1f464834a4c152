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
PARTS = ("env", "pytest", "kernels", "hang", "bench", "train")


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
    assert s["status"] == {"env": "ok", "pytest": "missing", "kernels": "skipped", "hang": "timeout", "bench": "ok",
                           "train": "ok"}
    t = s["targets"]
    assert t["stickbreaking_fwd_bwd_over_sdpa_flash_T4096_random"]["met"] is True
    assert t["moe_mlp_layer_fraction_of_dense"]["met"] is False
    assert t["training_mfu"]["met"] is True
    assert t["no_hang_in_50_runs"]["met"] is False  # killed at its time limit


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
    assert parts["kernels"]["failed"] == [] and len(parts["kernels"]["checks"]) >= 8
    assert parts["hang"]["checks"]["hang_shape"]["bitwise_identical_to_first"] is True
    assert parts["train"]["checks"]["train"]["steps"] == 3
    assert {"mlp_expert_gemms_fwd_bwd", "moe_mlp_layer_fwd_bwd", "stickbreaking_fwd_bwd_heads16_d64"} <= set(parts["bench"]["checks"])
    assert "== gpu_check done" in (tmp_path / "out" / "gpu_check.log").read_text()
