"""Host syncs in a non-logging training step (counted on the CPU, where they cost nothing, because on a
GPU each one stalls the step). The budget, documented in docs/training.md ("Host syncs"):

- the trainer, the model, the monitor, the losses: none;
- the CPU per-expert GEMM loop: one per MoE sub-layer forward (its row counts; the Triton path reads
  them on the device), at ep_size 1;
- under expert parallelism: one per MoE sub-layer forward for the all-to-all split sizes, which also
  carry the row counts (so the GEMM loop adds none);
- the CPU stick-breaking path (CPU only; the GPU runs the Triton kernel): its early-exit test per tile;
- the stop-request agreement after each step (``comm.any_rank``): one CPU all-reduce read on the host,
  on a gloo group, so it never waits for the GPU;
- DeepSpeed's own gradient-norm / overflow checks inside ``engine.step()``: at most DEEPSPEED_MAX.
"""

from __future__ import annotations


import pytest

from tests.train._sync_count import count_worker, counting_step, job_overrides
from molm_ds.testing import TINY_JOB

pytestmark = pytest.mark.slow

SUBLAYER_FORWARDS = 2 * 2 * 2  # tiny: 2 layers x (attention + MLP) x 2 micro-batches per step
DEEPSPEED_MAX = 8
CPU_ONLY = {"molm_ds/ops/stickbreaking_cpu.py"}


def _check(counts: dict, per_sublayer: dict[str, int]) -> None:
    ours = {f: n for f, n in counts.items() if f.startswith(("molm_ds/", "launch/"))}
    expected = {f: SUBLAYER_FORWARDS * n for f, n in per_sublayer.items() if n}
    expected["molm_ds/parallel/comm.py"] = 1  # the stop-request agreement (CPU tensor, gloo)
    unexpected = {f: n for f, n in ours.items() if f not in expected and f not in CPU_ONLY}
    assert not unexpected, f"host syncs where there should be none: {unexpected} (all: {counts})"
    for f, n in expected.items():
        assert ours.get(f, 0) == n, f"{f}: {ours.get(f, 0)} syncs, budget {n} (all: {counts})"
    assert counts.get("deepspeed", 0) <= DEEPSPEED_MAX, counts
    assert set(counts) <= set(ours) | {"deepspeed"}, f"syncs from elsewhere: {counts}"


def test_one_process_ep1(shard, tmp_path):
    from molm_ds.train import load_job
    from molm_ds.train.loop import train

    with counting_step() as counts:
        train(load_job(TINY_JOB, job_overrides(shard, str(tmp_path), 1)))
    _check(dict(counts), {"molm_ds/ops/grouped_gemm.py": 1})


@pytest.mark.distributed
def test_two_ranks_ep2(shard, tmp_path):
    from molm_ds.testing import run_ranks

    for counts in run_ranks(count_worker, world_size=2, args=(shard, str(tmp_path))):
        _check(counts, {"molm_ds/parallel/dispatch.py": 1})


def test_the_counter_sees_a_sync_in_the_step(shard, tmp_path, monkeypatch):
    """The count must be able to fail: a loss read on the host in every micro-batch is seen."""
    from molm_ds.train import load_job, step
    from molm_ds.train.loop import train

    real = step.total_loss
    monkeypatch.setattr(step, "total_loss", lambda **kw: (lambda loss: (loss.item(), loss)[1])(real(**kw)))
    with counting_step() as counts:
        train(load_job(TINY_JOB, job_overrides(shard, str(tmp_path), 1)))
    assert counts["tests/train/test_host_syncs.py"] == 2  # one per micro-batch
