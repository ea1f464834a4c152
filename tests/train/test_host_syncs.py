"""Would-be CUDA syncs in a non-logging training step, seen on the CPU (``tests/sync_mode.py``: every aten
op whose output shape depends on values or that returns a host value, every host read or blocking copy
of a tensor), through the DeepSpeed engine: forward, loss terms, backward, optimizer step, bookkeeping.
The budget, documented in docs/training.md ("Host syncs"):

- molm-ds code at ep_size 1: none, except under ZeRO-0 the optimizer's skip decision
  (``guard_plain_optimizer``: one host bool per optimizer step, as DeepSpeed's ZeRO-1/2 do it);
- under expert parallelism: one per MoE sub-layer forward, the all-to-all split sizes (which also carry
  the row counts, and serve the backward's reverse all-to-all too);
- DeepSpeed's ZeRO-1/2 optimizer: its own skip and clip decisions (``is_invalid_grad_norm``), only.
"""

from __future__ import annotations


import pytest

from tests.train._sync_count import count_worker, counting_step, job_overrides
from molm_ds.testing import TINY_JOB

pytestmark = pytest.mark.slow

SUBLAYER_FORWARDS = 2 * 2 * 2  # tiny: 2 layers x (attention + MLP) x 2 micro-batches per step
DEEPSPEED_DECISION = "deepspeed:is_invalid_grad_norm"


def _check(counts: dict, ours_expected: dict) -> None:
    ours = {k: n for k, n in counts.items() if not k[0].startswith("deepspeed:")}
    assert ours == ours_expected, f"syncs in the step: {ours}, budget {ours_expected} (all: {counts})"
    theirs = {k[0] for k in counts if k[0].startswith("deepspeed:")}
    assert theirs <= {DEEPSPEED_DECISION}, f"DeepSpeed syncs besides its skip/clip decision: {counts}"


def _train(shard, run_dir, ep_size, *extra):
    from molm_ds.train import load_job
    from molm_ds.train.loop import train

    with counting_step() as counts:
        train(load_job(TINY_JOB, job_overrides(shard, str(run_dir), ep_size, *extra)))
    return dict(counts)


def test_one_process_ep1_zero1(shard, tmp_path):
    counts = _train(shard, tmp_path, 1)
    _check(counts, {})
    assert any(k[0] == DEEPSPEED_DECISION for k in counts), counts  # ZeRO-1 decides on the host


def test_one_process_ep1_zero0(shard, tmp_path):
    counts = _train(shard, tmp_path, 1, "deepspeed.config=ds_configs/zero0_fp32.json")
    _check(counts, {("molm_ds/parallel/clip.py:step", "aten._local_scalar_dense"): 1})


@pytest.mark.distributed
def test_two_ranks_ep2(shard, tmp_path):
    from molm_ds.testing import run_ranks

    for counts in run_ranks(count_worker, world_size=2, args=(shard, str(tmp_path))):
        _check(counts, {("molm_ds/parallel/dispatch.py:plan", "Tensor.tolist"): SUBLAYER_FORWARDS})


def test_the_counter_sees_a_sync_in_the_step(shard, tmp_path, monkeypatch):
    """The count must be able to fail: a loss read on the host in every micro-batch is seen."""
    from molm_ds.train import step

    real = step.total_loss
    monkeypatch.setattr(step, "total_loss", lambda **kw: (lambda loss: (loss.item(), loss)[1])(real(**kw)))
    counts = _train(shard, tmp_path, 1)
    assert counts[("tests/train/test_host_syncs.py:<lambda>", "aten._local_scalar_dense")] == 2  # one per micro-batch
