"""training.deterministic: the same job twice gives bit-identical losses, gradient norms, checkpoints (every
tensor, optimizer moments included: they are the gradients' history); the mode is on during the run and
off again after it."""

from __future__ import annotations

import glob
import os

import pytest
import torch

from molm_ds.train import load_job, loop
from molm_ds.testing import TINY_JOB, read_metrics, tiny_job_overrides

pytestmark = pytest.mark.slow


def _tensors(ckpt_dir, tag):
    out = {}
    for f in sorted(glob.glob(os.path.join(ckpt_dir, tag, "**", "*.pt"), recursive=True)):
        def walk(prefix, v):
            if torch.is_tensor(v):
                out[prefix] = v
            elif isinstance(v, dict):
                for k, x in v.items():
                    walk(f"{prefix}/{k}", x)
            elif isinstance(v, (list, tuple)):
                for i, x in enumerate(v):
                    walk(f"{prefix}/{i}", x)
        walk(os.path.relpath(f, ckpt_dir), torch.load(f, map_location="cpu", weights_only=False))
    return out


def test_same_job_twice_is_bit_identical(shard, tmp_path):
    seen = []

    def hook(step, row):
        seen.append(torch.are_deterministic_algorithms_enabled())

    o = ["training.deterministic=true", "training.steps=3", "checkpoint.interval=0",
         "model.overrides={k_att: 3, dropout: 0.1, router_balance: bias, router_bias_rate: 0.01}"]
    runs = []
    for name in ("a", "b"):
        job = load_job(TINY_JOB, tiny_job_overrides(shard, tmp_path / name) + o)
        runs.append(loop.train(job, hooks=[hook]))
    assert seen and all(seen) and not torch.are_deterministic_algorithms_enabled()
    ra, rb = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert sorted(ra) == [1, 2, 3]
    for s in ra:
        for key in ("loss", "lm_loss", "mi", "grad_norm", "val_loss"):
            if key in ra[s]:
                assert ra[s][key] == rb[s][key], (s, key)
    ta = _tensors(runs[0]["checkpoint_dir"], "step_00000003")
    tb = _tensors(runs[1]["checkpoint_dir"], "step_00000003")
    assert len(ta) > 20 and ta.keys() == tb.keys()
    differ = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not differ, differ[:5]
