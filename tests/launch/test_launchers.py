"""End-to-end launches of launch/pretrain.py on 2 CPU ranks: the deepspeed launcher (plus a resume
that must match the uninterrupted run), a two-node --no_ssh launch on one machine, and mpirun.
Each spawns processes (DeepSpeed start-up dominates), so they are marked slow."""

import os
import shutil
import subprocess
import sys

import pytest

from molm_ds.testing import BIN, REPO, TIMEOUT, TINY_JOB, assert_trained, check, deepspeed_cmd, free_port, job_args, \
    read_metrics, tiny_job_overrides
from molm_ds.testing import launch_env as env
from molm_ds.testing import run_command as run

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

@pytest.fixture(scope="module")
def ep2_run(shard, tmp_path_factory):
    """The tiny job trained 4 steps by `deepspeed --num_gpus 2` at ep_size 2 (checkpoints at steps 2, 4)."""
    run_dir = tmp_path_factory.mktemp("ep2") / "a"
    out = run(deepspeed_cmd(2) + job_args(shard, run_dir))
    assert "rank 1 of 2" in out
    return run_dir, assert_trained(run_dir)


def test_deepspeed_two_ranks_and_resume(shard, ep2_run, tmp_path):
    a, full = ep2_run
    # N + resume + N on 2 ranks with the all-to-all dispatcher: identical losses
    run(deepspeed_cmd(2) + job_args(shard, tmp_path / "b", f"resume={a / 'checkpoints' / 'step_00000002'}"))
    resumed = read_metrics(tmp_path / "b")
    assert sorted(resumed) == [3, 4]
    for s in (3, 4):
        assert (resumed[s]["loss"], resumed[s]["grad_norm"]) == (full[s]["loss"], full[s]["grad_norm"])


def test_ep2_checkpoint_warm_starts_at_ep1_and_ep4(shard, ep2_run, tmp_path):
    """Weights saved at ep_size 2 load through the trainer (`init_from`) at ep_size 1 (one plain python
    process) and 4 (4 ranks) and training continues. With lr ~0 for the one step, the validation loss after
    it is the checkpoint's: the same 8 validation samples at every world size (micro-batch 4 x 1 rank,
    1 x 4 ranks; the ep2 run used 2 x 2), so both must match the ep2 run's own step-4 validation loss."""
    a, full = ep2_run
    common = [f"init_from={a / 'checkpoints' / 'step_00000004'}", "training.steps=1", "training.warmup_steps=0",
              "training.lr=1e-12", "training.grad_accum_steps=1", "training.eval_interval=1"]
    val = {}
    for ep, micro in ((1, 4), (4, 1)):
        run_dir = tmp_path / f"ep{ep}"
        args = ["launch/pretrain.py", "--config", str(TINY_JOB)]
        for o in tiny_job_overrides(shard, run_dir) + common + [f"parallel.ep_size={ep}",
                                                                  f"training.micro_batch_size={micro}"]:
            args += ["--set", o]
        out = run([sys.executable] + args if ep == 1 else deepspeed_cmd(ep) + args)
        assert f"rank 0 of {ep}" in out
        rows = read_metrics(run_dir)
        assert sorted(rows) == [1] and rows[1]["loss"] > 0
        assert os.path.isfile(os.path.join(run_dir, "checkpoints", "step_00000001", "COMPLETE"))
        val[ep] = rows[1]["val_loss"]
    for ep in (1, 4):
        assert val[ep] == pytest.approx(full[4]["val_loss"], rel=1e-5, abs=1e-6), (ep, val, full[4]["val_loss"])
    # the comparison can tell checkpoints apart (steps 2 and 4 of the same run differ by far more than rel 1e-5)
    assert abs(full[4]["val_loss"] - full[2]["val_loss"]) > 1e-3


def test_resume_at_other_world_and_ep_sizes_through_the_launchers(shard, ep2_run, tmp_path):
    """The ep2 run's step-2 checkpoint resumed by one plain python process (ep 1) and by
    `deepspeed --num_gpus 4` (ep 4), the global batch kept at 8 (grad_accum_steps 4 and 1): steps 3 and 4
    have the straight run's losses and gradient norms up to reduction order (fp32: 1e-5 relative)."""
    a, full = ep2_run
    for ep, accum in ((1, 4), (4, 1)):
        run_dir = tmp_path / f"ep{ep}"
        args = ["launch/pretrain.py", "--config", str(TINY_JOB), "--resume", str(a / "checkpoints" / "step_00000002")]
        for o in tiny_job_overrides(shard, run_dir) + [f"parallel.ep_size={ep}", f"training.grad_accum_steps={accum}"]:
            args += ["--set", o]
        out = run([sys.executable] + args if ep == 1 else deepspeed_cmd(ep) + args)
        assert "resumed" in out and "elastically" in out
        rows = read_metrics(run_dir)
        assert sorted(rows) == [3, 4]
        for s in (3, 4):
            for key in ("loss", "grad_norm"):
                assert rows[s][key] == pytest.approx(full[s][key], rel=1e-5), (ep, s, key, rows[s][key], full[s][key])


def test_no_ssh_two_nodes_on_one_machine(shard, tmp_path):
    port = str(free_port())
    hostfile = tmp_path / "hostfile"  # two "nodes" that are both this machine
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    procs = []
    for node in (0, 1):
        cmd = [str(BIN / "deepspeed"), "--hostfile", str(hostfile), "--no_ssh", "--num_nodes", "2",
               "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", port] + job_args(shard, tmp_path)
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    outs = []
    for p in procs:
        try:
            o, e = p.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outs.append(check(subprocess.CompletedProcess(p.args, p.returncode, o, e)))
    assert "rank 0 of 2" in outs[0] and "rank 1 of 2" in outs[1]
    assert_trained(tmp_path)


@pytest.mark.skipif(not (BIN / "mpirun").exists() and shutil.which("mpirun") is None, reason="no mpirun")
def test_mpirun_two_ranks(shard, tmp_path):
    mpirun = str(BIN / "mpirun") if (BIN / "mpirun").exists() else shutil.which("mpirun")
    cmd = [mpirun, "--allow-run-as-root", "--oversubscribe", "-np", "2",
           "-x", "DS_ACCELERATOR", "-x", "PYTHONPATH", "-x", "PATH", "-x", "OMP_NUM_THREADS",
           sys.executable] + job_args(shard, tmp_path)
    out = run(cmd)
    assert "launcher: mpi" in out and "rank 1 of 2" in out
    assert_trained(tmp_path)
