"""On one CUDA GPU (skipped elsewhere): the trainer runs with NCCL in fp32 and bf16, and a non-logging
step makes no host sync in molm-ds code (``torch.cuda.set_sync_debug_mode("warn")``).

scripts/gpu_check.sh runs these with ``pytest -m gpu``."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from tests.train.helpers import REPO, TINY_JOB, read_metrics, tiny_job_overrides, write_shard

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

DEEPSPEED_MAX = 8  # DeepSpeed's own gradient-norm / overflow checks inside engine.step()


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    return write_shard(tmp_path_factory.mktemp("data"))


@pytest.mark.parametrize("ds", ["zero1_fp32", "zero1_bf16", "zero0_bf16", "zero2_fp32"])
def test_three_steps_on_one_gpu_with_nccl(shard, tmp_path, ds):
    env = {k: v for k, v in os.environ.items() if k not in ("DS_ACCELERATOR", "RANK", "WORLD_SIZE", "MASTER_PORT")}
    env["PYTHONPATH"] = str(REPO)
    cmd = [sys.executable, "launch/pretrain.py", "--config", str(TINY_JOB)]
    for o in tiny_job_overrides(shard, tmp_path) + ["training.steps=3", f"deepspeed.config=ds_configs/{ds}.json"]:
        cmd += ["--set", o]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    assert "backend nccl" in out, "the trainer did not use NCCL"
    rows = read_metrics(tmp_path)
    assert sorted(rows) == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows.values())


def test_no_host_sync_in_molm_ds_code_during_a_step(shard, tmp_path):
    from molm_ds.train import load_job, loop
    from tests.train._sync_count import job_overrides

    real, calls, seen = loop.train_step, [0], []

    def train_step(*args, **kwargs):
        calls[0] += 1
        if calls[0] != 2:
            return real(*args, **kwargs)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                out = real(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        seen.extend(str(Path(x.filename).resolve()) for x in w if "synchroniz" in str(x.message).lower())
        return out

    if os.environ.get("DS_ACCELERATOR") == "cpu":
        pytest.skip("DS_ACCELERATOR=cpu: run without it (scripts/gpu_check.sh does)")
    loop.train_step = train_step
    try:
        loop.train(load_job(TINY_JOB, job_overrides(shard, str(tmp_path), 1)))
    finally:
        loop.train_step = real
    ours = [f for f in seen if f.startswith(str(REPO)) and "site-packages" not in f]
    assert not ours, f"host syncs in molm-ds code during a step: {ours}"
    assert sum("deepspeed" in f for f in seen) <= DEEPSPEED_MAX, seen
