"""End-to-end launches of launch/pretrain.py on 2 CPU ranks: the deepspeed launcher (plus a resume
that must match the uninterrupted run), a two-node --no_ssh launch on one machine, and mpirun.
Each spawns processes (DeepSpeed start-up dominates), so they are marked slow."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from molm_ds.train.distributed import free_port
from tests.train.helpers import REPO, TINY_JOB, read_metrics, tiny_job_overrides, write_shard

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

BIN = Path(sys.executable).parent
TIMEOUT = 600


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    return write_shard(tmp_path_factory.mktemp("data"))


def env():
    e = dict(os.environ, DS_ACCELERATOR="cpu", PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
             PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    # a private JIT cache for DeepSpeed's CPU comm op: processes built with other flags share the default
    # one and keep rebuilding it under each other (minutes per launch on a busy machine)
    e.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/torch_extensions_molm_ds_tests"))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)  # pytest may run after an in-process test set them
    return e


def job_args(shard, run_dir, *extra):
    args = ["launch/pretrain.py", "--config", str(TINY_JOB)]
    for o in tiny_job_overrides(shard, run_dir, **{"parallel.ep_size": 2}) + list(extra):
        args += ["--set", o]
    return args


def check(proc: subprocess.CompletedProcess) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    return out


def run(cmd, **kw) -> str:
    return check(subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=TIMEOUT, **kw))


def assert_trained(run_dir, steps=4):
    rows = read_metrics(run_dir)
    assert sorted(rows) == list(range(1, steps + 1))
    assert all(r["loss"] > 0 for r in rows.values()) and "val_loss" in rows[steps]
    assert os.path.isfile(os.path.join(run_dir, "checkpoints", f"step_{steps:08d}", "COMPLETE"))
    # one file per global expert: 2 layers x (attention + MLP) x 4 experts, though each rank holds 2
    files = list(Path(run_dir, "checkpoints", f"step_{steps:08d}").glob("layer_*_expert_*_mp_rank_00_model_states.pt"))
    assert len(files) == 16
    return rows


def test_deepspeed_two_ranks_and_resume(shard, tmp_path):
    ds = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port())]
    out = run(ds + job_args(shard, tmp_path / "a"))
    assert "rank 1 of 2" in out
    full = assert_trained(tmp_path / "a")
    # N + resume + N on 2 ranks with the all-to-all dispatcher: identical losses
    ds = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port())]
    run(ds + job_args(shard, tmp_path / "b", f"resume={tmp_path / 'a' / 'checkpoints' / 'step_00000002'}"))
    resumed = read_metrics(tmp_path / "b")
    assert sorted(resumed) == [3, 4]
    for s in (3, 4):
        assert (resumed[s]["loss"], resumed[s]["grad_norm"]) == (full[s]["loss"], full[s]["grad_norm"])


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
