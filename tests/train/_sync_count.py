"""Count host syncs (tensor -> Python value conversions) inside one non-logging training step.

Every ``Tensor.item / tolist / __int__ / __float__ / __bool__ / __index__`` call made from the start of
the second optimizer step of ``train()`` to the start of the third (the whole loop iteration: the step,
its bookkeeping, the stop-request agreement) is recorded with the first caller frame outside torch, as
``molm_ds/ops/grouped_gemm.py`` or ``deepspeed``. On a GPU each of them waits for the device.
"""

from __future__ import annotations

import collections
import contextlib
import os
import sys

import torch

METHODS = ("item", "tolist", "__int__", "__float__", "__bool__", "__index__")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_TORCH = os.path.dirname(torch.__file__)


def _origin() -> str:
    f = sys._getframe(2)
    while f is not None and f.f_code.co_filename.startswith(_TORCH):
        f = f.f_back
    if f is None:
        return "?"
    path = f.f_code.co_filename
    if path.startswith(REPO + os.sep) and "site-packages" not in path:
        return os.path.relpath(path, REPO)
    return "deepspeed" if f"{os.sep}deepspeed{os.sep}" in path else path


@contextlib.contextmanager
def counting_step(step: int = 2):
    """Patch the loop so that syncs during optimizer step ``step`` are counted; yields the Counter."""
    from molm_ds.train import loop

    counts: collections.Counter = collections.Counter()
    active = [False]
    originals = {m: getattr(torch.Tensor, m) for m in METHODS}

    def patched(name):
        orig = originals[name]

        def method(self, *args, **kwargs):
            if active[0]:
                counts[_origin()] += 1
            return orig(self, *args, **kwargs)
        return method

    real_step, calls = loop.train_step, [0]

    def train_step(*args, **kwargs):
        calls[0] += 1
        active[0] = calls[0] == step  # stays on until the next step begins
        return real_step(*args, **kwargs)

    for m in METHODS:
        setattr(torch.Tensor, m, patched(m))
    loop.train_step = train_step
    try:
        yield counts
    finally:
        active[0] = False
        loop.train_step = real_step
        for m, orig in originals.items():
            setattr(torch.Tensor, m, orig)


def job_overrides(shard: str, run_dir: str, ep_size: int) -> list[str]:
    from molm_ds.testing import tiny_job_overrides

    return tiny_job_overrides(shard, run_dir) + [
        "training.steps=3", "monitor.log_interval=100", "training.eval_interval=0", "checkpoint.interval=0",
        "checkpoint.save_final=false", "monitor.tensorboard=false", f"parallel.ep_size={ep_size}"]


def count_worker(rank: int, world_size: int, shard: str, run_dir: str) -> dict:
    from molm_ds.train import load_job
    from molm_ds.train.loop import train
    from molm_ds.testing import TINY_JOB

    with counting_step() as counts:
        train(load_job(TINY_JOB, job_overrides(shard, run_dir, world_size)))
    return dict(counts)
