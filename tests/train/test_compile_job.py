"""``training.compile: true`` trains with the compiled model (torch.compile of its forward, fullgraph at
every ep_size) and gives the losses of the eager run. The aot_eager backend runs the traced graphs op for op,
so the losses agree exactly; inductor's generated code agrees to float rounding (benchmarks/train_step.py
prints its first-step difference)."""

from __future__ import annotations

import pytest
import torch

from molm_ds.testing import TINY_JOB, read_metrics, tiny_job_overrides, write_shard

pytestmark = pytest.mark.slow


def _losses(shard, run_dir, compile_):
    from molm_ds.train import load_job
    from molm_ds.train.loop import train

    torch._dynamo.reset()
    train(load_job(TINY_JOB, tiny_job_overrides(shard, run_dir) + [
        "training.steps=3", "training.eval_interval=0", "checkpoint.interval=0", "checkpoint.save_final=false",
        "monitor.tensorboard=false", f"training.compile={str(compile_).lower()}", "training.compile_backend=aot_eager"]))
    return [r["loss"] for _, r in sorted(read_metrics(run_dir).items()) if "loss" in r]


def test_compiled_training_has_the_eager_losses(tmp_path, monkeypatch):
    monkeypatch.setenv("MOLM_DS_KERNELS", "torch")
    shard = write_shard(tmp_path / "data")
    calls = []
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda *a, **k: (calls.append(k) if "backend" in k else None, real(*a, **k))[1])
    eager = _losses(shard, tmp_path / "eager", False)
    assert calls == []
    compiled = _losses(shard, tmp_path / "compiled", True)
    assert calls == [{"backend": "aot_eager", "fullgraph": True}]
    assert len(eager) == 3 and compiled == eager


@pytest.mark.distributed
def test_compiled_training_under_expert_parallelism(tmp_path, monkeypatch):
    """ep_size 2 on 2 gloo ranks: the compiled model (one graph, the all-to-all split sizes symbolic) gives
    the eager losses."""
    from molm_ds.testing import run_ranks

    from tests.train._compile_workers import losses_worker

    monkeypatch.setenv("MOLM_DS_KERNELS", "torch")
    shard = write_shard(tmp_path / "data")
    eager = run_ranks(losses_worker, world_size=2, args=(shard, str(tmp_path / "eager"), False))
    compiled = run_ranks(losses_worker, world_size=2, args=(shard, str(tmp_path / "compiled"), True))
    assert len(eager[0]) == 3 and compiled == eager
