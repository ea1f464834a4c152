"""On one CUDA GPU (skipped elsewhere): the trainer runs with NCCL in fp32 and bf16, and a non-logging
step never waits for the GPU: it runs under ``torch.cuda.set_sync_debug_mode("error")``, so any
synchronising call in it (molm-ds's or DeepSpeed's) raises.

scripts/gpu_check.sh runs these with ``pytest -m gpu``."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings

import pytest
import torch

from molm_ds.testing import REPO, TINY_JOB, read_metrics, tiny_job_overrides

DEEPSPEED_STEP_MAX = 8  # DeepSpeed's own gradient-norm / overflow reads inside engine.step()

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("ds", ["zero1_fp32", "zero1_bf16", "zero0_bf16", "zero2_fp32"])
def test_three_steps_on_one_gpu_with_nccl(shard, tmp_path, ds):
    env = {k: v for k, v in os.environ.items() if k not in ("DS_ACCELERATOR", "RANK", "WORLD_SIZE", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])  # keep carried wheels
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


def test_a_non_logging_step_never_waits_for_the_gpu(shard, tmp_path):
    from molm_ds.train import load_job, loop
    from tests.train._sync_count import job_overrides

    if os.environ.get("DS_ACCELERATOR") == "cpu":
        pytest.skip("DS_ACCELERATOR=cpu: run without it (scripts/gpu_check.sh does)")
    real, calls, checked, deepspeed_syncs = loop.train_step, [0], [], []

    def train_step(engine, *args, **kwargs):
        calls[0] += 1
        if calls[0] != 2:  # step 1 compiles and warms up; step 2 logs nothing (log_interval 100)
            return real(engine, *args, **kwargs)
        real_engine_step = engine.step

        def engine_step(*a, **k):  # DeepSpeed's skip decision reads the device: counted, not forbidden
            torch.cuda.set_sync_debug_mode("warn")
            try:
                with warnings.catch_warnings(record=True) as w:
                    warnings.simplefilter("always")
                    return real_engine_step(*a, **k)
            finally:
                deepspeed_syncs.extend(str(x.message) for x in w if "synchroniz" in str(x.message).lower())
                torch.cuda.set_sync_debug_mode("error")

        engine.step = engine_step
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = real(engine, *args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")
            engine.step = real_engine_step
        checked.append(True)
        return out

    loop.train_step = train_step
    try:
        loop.train(load_job(TINY_JOB, job_overrides(shard, str(tmp_path), 1)))
    finally:
        loop.train_step = real
    assert checked == [True], "step 2 did not run under the sync check"
    assert len(deepspeed_syncs) <= DEEPSPEED_STEP_MAX, deepspeed_syncs
