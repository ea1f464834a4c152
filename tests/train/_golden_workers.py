"""Rank workers for the trainer golden traces (spawned by molm_ds.testing.run_ranks)."""

from __future__ import annotations

import torch


def train_worker(rank: int, world_size: int, overrides: list[str]) -> dict:
    from molm_ds.train import load_job
    from molm_ds.train.loop import train
    from molm_ds.testing import TINY_JOB, read_metrics

    torch.set_num_threads(1)
    job = load_job(TINY_JOB, overrides)
    train(job)
    return read_metrics(job.run_dir) if rank == 0 else {}
