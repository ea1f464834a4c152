"""Record would-be CUDA syncs (``tests/sync_mode.py``) inside one non-logging training step.

Everything from the start of the second optimizer step of ``train()`` to the start of the third (the
step, its bookkeeping, the stop-request agreement) is recorded; the batches the loader returns are host
tensors (``SyncRecorder.mark_host``), so copying them to the device blocking would be seen.
"""

from __future__ import annotations

import collections
import contextlib

from tests.sync_mode import SyncRecorder


@contextlib.contextmanager
def counting_step(step: int = 2):
    """Patch the loop so that syncs during optimizer step ``step`` are recorded; yields a Counter of
    ``(origin, what)`` filled when the block ends."""
    from molm_ds.train import loop

    counts: collections.Counter = collections.Counter()
    rec = SyncRecorder()
    real_step, calls = loop.train_step, [0]

    def train_step(engine, next_batch, *args, **kwargs):
        calls[0] += 1
        rec.active = calls[0] == step  # stays on until the next step begins

        def host_batch():
            batch = next_batch()
            rec.mark_host(*batch.values())
            return batch
        return real_step(engine, host_batch, *args, **kwargs)

    loop.train_step = train_step
    try:
        with rec:
            yield counts
    finally:
        rec.active = False
        loop.train_step = real_step
        counts.update(rec.events)


def job_overrides(shard: str, run_dir: str, ep_size: int, *extra: str) -> list[str]:
    from molm_ds.testing import tiny_job_overrides

    return tiny_job_overrides(shard, run_dir) + [
        "training.steps=3", "monitor.log_interval=100", "training.eval_interval=0", "checkpoint.interval=0",
        "checkpoint.save_final=false", "monitor.tensorboard=false", f"parallel.ep_size={ep_size}", *extra]


def count_worker(rank: int, world_size: int, shard: str, run_dir: str) -> dict:
    from molm_ds.train import load_job
    from molm_ds.train.loop import train
    from molm_ds.testing import TINY_JOB

    with counting_step() as counts:
        train(load_job(TINY_JOB, job_overrides(shard, run_dir, world_size)))
    return dict(counts)
