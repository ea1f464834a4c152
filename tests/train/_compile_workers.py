"""Rank worker for tests/train/test_compile_job.py (importable by spawned processes)."""

from __future__ import annotations


def losses_worker(rank: int, world_size: int, shard: str, run_dir: str, compile_: bool) -> list:
    import torch

    from molm_ds.train import load_job
    from molm_ds.train.loop import train
    from molm_ds.testing import TINY_JOB, read_metrics, tiny_job_overrides

    torch._dynamo.reset()
    train(load_job(TINY_JOB, tiny_job_overrides(shard, run_dir) + [
        "training.steps=3", "training.eval_interval=0", "checkpoint.interval=0", "checkpoint.save_final=false",
        "monitor.tensorboard=false", f"parallel.ep_size={world_size}", f"training.compile={str(compile_).lower()}",
        "training.compile_backend=aot_eager"]))
    return [r["loss"] for _, r in sorted(read_metrics(run_dir).items()) if "loss" in r]
