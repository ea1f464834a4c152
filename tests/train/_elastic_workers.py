"""Rank workers for the elastic-resume tests: train a tiny job, recording which samples each rank read."""

from __future__ import annotations

import torch


def train_recording(rank: int, world_size: int, overrides: list[str]) -> dict:
    """Train; returns {"metrics": rows (rank 0), "samples": global sample ids this rank trained on}.

    A global sample id is the loader's global sample counter: the mixture schedule maps it to one
    (source, window), so equal id sets mean equal training data."""
    from molm_ds.data.mixture import MixtureLoader
    from molm_ds.jobs import run
    from molm_ds.train import load_job
    from molm_ds.testing import TINY_JOB, read_metrics

    torch.set_num_threads(1)
    job = load_job(TINY_JOB, overrides)
    seen, real = [], MixtureLoader.next_batch

    def next_batch(self):
        if self.split == "train":
            first = self._samples + self.dp_rank * self.micro_batch_size
            seen.extend(range(first, first + self.micro_batch_size))
        return real(self)

    MixtureLoader.next_batch = next_batch
    try:
        run(job)
    finally:
        MixtureLoader.next_batch = real
    return {"metrics": read_metrics(job.run_dir) if rank == 0 else {}, "samples": seen}
