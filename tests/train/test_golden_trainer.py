"""Golden traces through the real trainer: per-step loss and gradient norm of `train()` on a tiny
fp32 job, one process (ep_size 1) and 2 gloo ranks (ep_size 2), committed in tests/assets/losses/.
Refactors of the training core must reproduce them exactly on the CPU they were recorded on (same
`torch.backends.cpu.get_cpu_capability()`); on another instruction set the matmul kernels round
differently, so there the comparison allows 1e-5 relative.

Regenerate (only for an intended numerics change, and say so in the commit):
    MOLM_DS_REGEN_GOLDEN=1 python -m pytest tests/train/test_golden_trainer.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from molm_ds.testing import tiny_job_overrides

pytestmark = pytest.mark.slow

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "losses"
KEYS = ("loss", "lm_loss", "grad_norm")
STEPS = 6


def _overrides(shard, run_dir, ep_size):
    return tiny_job_overrides(shard, run_dir) + [
        f"training.steps={STEPS}", "training.eval_interval=0", "checkpoint.interval=0",
        "checkpoint.save_final=false", "monitor.tensorboard=false", f"parallel.ep_size={ep_size}",
        "deepspeed.config=ds_configs/zero1_fp32.json"]


def _trace(rows: dict) -> list[dict]:
    return [{"step": s, **{k: rows[s][k] for k in KEYS}} for s in sorted(rows)]


def _compare(name: str, trace: list[dict]) -> None:
    path = ASSETS / f"trainer_{name}.json"
    cap = torch.backends.cpu.get_cpu_capability()
    if os.environ.get("MOLM_DS_REGEN_GOLDEN") == "1":
        path.write_text(json.dumps({"cpu_capability": cap, "steps": trace}, indent=1) + "\n")
        pytest.skip(f"regenerated {path}")
    golden = json.loads(path.read_text())
    assert [r["step"] for r in trace] == [r["step"] for r in golden["steps"]]
    exact = golden["cpu_capability"] == cap
    for got, want in zip(trace, golden["steps"]):
        for k in KEYS:
            if exact:
                assert got[k] == want[k], f"{name} step {got['step']} {k}: {got[k]!r} != golden {want[k]!r}"
            else:
                assert got[k] == pytest.approx(want[k], rel=1e-5), (name, got["step"], k)
    assert trace[-1]["lm_loss"] < trace[0]["lm_loss"], "the tiny run should learn"


def test_trainer_trace_one_process(shard, tmp_path):
    from molm_ds.train import load_job
    from molm_ds.train.loop import train
    from molm_ds.testing import TINY_JOB, read_metrics

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(load_job(TINY_JOB, _overrides(shard, tmp_path, 1)))
    finally:
        torch.set_num_threads(threads)
    _compare("ep1", _trace(read_metrics(tmp_path)))


@pytest.mark.distributed
def test_trainer_trace_two_ranks_ep2(shard, tmp_path):
    from molm_ds.testing import run_ranks

    from tests.train._golden_workers import train_worker

    rows = run_ranks(train_worker, world_size=2, args=(_overrides(shard, tmp_path, 2),))[0]
    _compare("ep2", _trace(rows))
