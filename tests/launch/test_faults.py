"""Fault injection through the launchers (slow, CPU/gloo): SIGTERM to the `deepspeed` launcher, SIGUSR1
to one rank, SIGTERM to a single process, and kill -9 of a rank at random points while checkpoints
are written. Each ends with every rank gone (no orphans) and a verified resume that continues the run
as if it had not been interrupted."""

from __future__ import annotations

import os
import random
import signal
import sys
import time

import pytest

from molm_ds import checkpoint as ckpt
from molm_ds.testing import TIMEOUT, TINY_JOB, deepspeed_cmd, job_args, ranks_of, read_metrics, start, \
    tiny_job_overrides, train_in_ranks, wait_for_steps, wait_gone
from molm_ds.testing import run_command as run

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

# a constant learning rate: the schedule must not depend on training.steps, which the resumed and the
# straight runs change
CONST_LR = ["training.warmup_steps=0", "training.min_lr_ratio=1.0"]
LONG = ["training.steps=400", "checkpoint.interval=0", "training.eval_interval=0", "monitor.tensorboard=false", *CONST_LR]
EXIT_PREEMPTED = 75


def assert_stopped_with_checkpoint(run_dir, out) -> int:
    assert "stopped at step" in out, out[-3000:]
    step = int(out.split("stopped at step ")[1].split()[0])
    d = os.path.join(run_dir, "checkpoints")
    assert ckpt.newest_complete(d) == ckpt.tag_for(step) and ckpt.verify(d, ckpt.tag_for(step)) is None
    return step


def resume_equals_straight(shard, run_dir, tmp_path, stop_step, launcher):
    """--resume auto continues bit-identically: the next 2 steps equal an uninterrupted run's (the same job
    on as many gloo ranks, ep_size 2)."""
    steps = [f"training.steps={stop_step + 2}", "checkpoint.interval=0", "training.eval_interval=0",
             "monitor.tensorboard=false", *CONST_LR]
    run(launcher + job_args(shard, run_dir, *steps) + ["--resume", "auto"])
    train_in_ranks(TINY_JOB, tiny_job_overrides(shard, tmp_path / "straight", **{"parallel.ep_size": 2}) + steps)
    got, want = read_metrics(run_dir), read_metrics(tmp_path / "straight")
    for s in (stop_step + 1, stop_step + 2):
        assert (got[s]["loss"], got[s]["grad_norm"]) == (want[s]["loss"], want[s]["grad_norm"]), s


def test_sigterm_to_the_deepspeed_launcher(shard, tmp_path):
    run_dir = tmp_path / "run"
    p = start(deepspeed_cmd(2) + job_args(shard, run_dir, *LONG))
    wait_for_steps(run_dir, 3, p)
    ranks = ranks_of(p)
    assert len(ranks) == 2
    os.kill(p.pid, signal.SIGTERM)  # the launcher does not forward it: the ranks see it die
    wait_gone(ranks)
    out = p.stdout.read()
    step = assert_stopped_with_checkpoint(run_dir, out)
    resume_equals_straight(shard, run_dir, tmp_path, step, deepspeed_cmd(2))


def test_sigusr1_to_one_rank_stops_both_at_the_same_step(shard, tmp_path):
    run_dir = tmp_path / "run"
    p = start(deepspeed_cmd(2) + job_args(shard, run_dir, *LONG))
    wait_for_steps(run_dir, 3, p)
    ranks = ranks_of(p)
    os.kill(ranks[-1].pid, signal.SIGUSR1)
    assert p.wait(timeout=TIMEOUT) == EXIT_PREEMPTED
    wait_gone(ranks)
    assert_stopped_with_checkpoint(run_dir, p.stdout.read())


def test_sigterm_to_a_single_process(shard, tmp_path):
    run_dir = tmp_path / "run"
    p = start([sys.executable] + job_args(shard, run_dir, *LONG, "parallel.ep_size=1"))
    wait_for_steps(run_dir, 3, p)
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=TIMEOUT) == EXIT_PREEMPTED
    assert_stopped_with_checkpoint(run_dir, p.stdout.read())


def test_kill9_of_a_rank_during_saves_never_leaves_a_damaged_resume_target(shard, tmp_path):
    """A checkpoint after every step, so most of the time is spent saving; a rank is killed with SIGKILL at
    a random moment, three times. Each time every rank ends and `--resume auto` resumes from a checkpoint
    that verifies (or starts fresh when none was complete)."""
    rng = random.Random(1234)
    run_dir = tmp_path / "run"
    every = ["training.steps=400", "checkpoint.interval=1", "checkpoint.keep=2", "training.eval_interval=0",
             "monitor.tensorboard=false"]
    reached = 0
    for trial in range(3):
        p = start(deepspeed_cmd(2) + job_args(shard, run_dir, *every) + (["--resume", "auto"] if trial else []))
        wait_for_steps(run_dir, reached + 2, p)
        time.sleep(rng.uniform(0.0, 1.5))
        ranks = ranks_of(p)
        os.kill(rng.choice(ranks).pid, signal.SIGKILL)
        p.wait(timeout=TIMEOUT)
        wait_gone(ranks)
        d = os.path.join(run_dir, "checkpoints")
        target = ckpt.resolve_resume("auto", d)
        assert target is not None and ckpt.verify(*target) is None, (trial, os.listdir(d))
        reached = max(read_metrics(run_dir))
    final = reached + 3
    out = run(deepspeed_cmd(2) + job_args(shard, run_dir, f"training.steps={final}", "checkpoint.interval=0",
                                          "training.eval_interval=0", "monitor.tensorboard=false") + ["--resume", "auto"])
    assert "resumed from" in out and max(read_metrics(run_dir)) == final
