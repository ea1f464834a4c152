"""Resume at another world size and ep_size (and ZeRO stage): a 2-rank ep_size-2 run saves at step N;
runs resumed from that checkpoint on 1 rank (ep 1) and 4 ranks (ep 2, ep 4), with the same global batch,
train steps N+1..2N with the losses and gradient norms of the uninterrupted run, up to reduction order
(fp32, lr 1e-3: 1e-5 relative), on exactly the samples it trains on.
In-process gloo ranks here; tests/launch/test_elastic_cli.py does one of them through the launchers."""

from __future__ import annotations


import pytest

from molm_ds.testing import tiny_job_overrides

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

N = 2
GLOBAL_BATCH = 8  # micro_batch_size 2 x grad_accum_steps x world size
REL = 1e-5


def _ranks():
    from molm_ds.testing import run_ranks

    return run_ranks


def _job(shard, run_dir, *, world, ep, ds, steps, resume=None):
    o = tiny_job_overrides(shard, run_dir) + [
        f"training.steps={steps}", f"training.grad_accum_steps={GLOBAL_BATCH // (2 * world)}", "training.lr=1e-3",
        "training.warmup_steps=1", "training.eval_interval=0", f"checkpoint.interval={N}", f"parallel.ep_size={ep}",
        f"deepspeed.config=ds_configs/{ds}.json", "monitor.tensorboard=false"]
    return o + ([f"resume={resume}"] if resume else [])


@pytest.fixture(scope="module")
def straight(shard, tmp_path_factory):
    """The uninterrupted runs (2 ranks, ep_size 2), per ZeRO config: their step-N checkpoints are the resume points."""
    from tests.train._elastic_workers import train_recording

    out = {}
    for ds in ("zero1_fp32", "zero0_fp32", "zero2_fp32"):
        d = tmp_path_factory.mktemp(f"straight-{ds}")
        res = _ranks()(train_recording, world_size=2, args=(_job(shard, d, world=2, ep=2, ds=ds, steps=2 * N),))
        out[ds] = (d, res)
    return out


def _samples(results, steps) -> list[int]:
    """Global sample ids of optimizer steps `steps` (1-based), over all ranks, sorted."""
    ids = sorted(i for r in results for i in r["samples"])
    return [i for i in ids if (i // GLOBAL_BATCH) + 1 in steps]


@pytest.mark.parametrize("world,ep,ds", [(1, 1, "zero1_fp32"), (4, 2, "zero1_fp32"), (4, 4, "zero1_fp32"),
                                         (1, 1, "zero0_fp32"), (4, 4, "zero2_fp32"), (4, 2, "zero0_fp32")])
def test_resume_at_another_topology_matches_the_straight_run(shard, tmp_path, straight, world, ep, ds):
    from tests.train._elastic_workers import train_recording

    d, ref = straight[ds]
    resumed = _ranks()(train_recording, world_size=world,
                       args=(_job(shard, tmp_path, world=world, ep=ep, ds=ds, steps=2 * N,
                                  resume=f"{d}/checkpoints/step_{N:08d}"),))
    got, want = resumed[0]["metrics"], ref[0]["metrics"]
    assert sorted(got) == list(range(N + 1, 2 * N + 1))
    for s in got:
        for key in ("loss", "lm_loss", "grad_norm", "lr"):
            assert got[s][key] == pytest.approx(want[s][key], rel=REL), (s, key, got[s][key], want[s][key])
    later = range(N + 1, 2 * N + 1)
    assert _samples(resumed, later) == _samples(ref, later) == list(range(N * GLOBAL_BATCH, 2 * N * GLOBAL_BATCH))


def test_resume_without_elastic_state_at_another_topology_is_refused(shard, tmp_path):
    from molm_ds.errors import CheckpointError
    from molm_ds.train import load_job
    from molm_ds.train.loop import train
    from molm_ds.train.recipe import Recipe
    from tests.train._elastic_workers import train_recording
    from molm_ds.testing import TINY_JOB

    a = tmp_path / "a"
    _ranks()(train_recording, world_size=2, args=(_job(shard, a, world=2, ep=2, ds="zero1_fp32", steps=N)
                                                  + ["checkpoint.elastic=false"],))
    job = load_job(TINY_JOB, _job(shard, tmp_path / "b", world=1, ep=1, ds="zero1_fp32", steps=2 * N,
                                  resume=f"{a}/checkpoints"))

    def no_model(self):
        raise AssertionError("built the model before refusing")

    Recipe.build_model, real = no_model, Recipe.build_model
    try:
        with pytest.raises(CheckpointError, match="without its topology-free optimizer state.*init_from"):
            train(job)
    finally:
        Recipe.build_model = real
