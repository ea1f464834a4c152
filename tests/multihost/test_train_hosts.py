"""Training across hosts (network namespaces, tests/multihost/conftest.py): 2 hosts x 2 ranks with the
DeepSpeed launcher (--no_ssh, one launcher per host), mpirun (an rsh agent that enters the namespace) and
torchrun (static and elastic rendezvous), expert parallelism spanning the hosts (ep_size 4); each run's
losses equal a one-host run of the same job, its checkpoint is the one-host run's file for file, and a
resume across hosts continues exactly. Each host's name resolves to 127.0.1.1 on itself, so these fail
unless every rank finds the interface that reaches the master by itself."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from molm_ds.train.distributed import free_port
from tests.multihost.conftest import REPO
from tests.train.helpers import TINY_JOB, read_metrics, tiny_job_overrides, write_shard

pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.multihost]

BIN = Path(sys.executable).parent
TIMEOUT = 600
STEPS = 4


def env(**extra) -> dict:
    e = dict(os.environ, DS_ACCELERATOR="cpu", PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
             PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    e.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/torch_extensions_molm_ds_tests"))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "GLOO_SOCKET_IFNAME",
              "NCCL_SOCKET_IFNAME", "LOCAL_WORLD_SIZE"):
        e.pop(k, None)
    e.update(extra)
    return e


def job_args(shard, run_dir, *extra, ep=4) -> list[str]:
    args = ["launch/pretrain.py", "--config", str(TINY_JOB)]
    for o in tiny_job_overrides(shard, run_dir, **{"parallel.ep_size": ep, "parallel.collective_timeout_s": 60}) + list(extra):
        args += ["--set", o]
    return args


def finish(procs: list[subprocess.Popen], timeout=TIMEOUT) -> list[str]:
    """Every process's output; all must exit 0."""
    outs = []
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            o, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            outs.append(o)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, o in zip(procs, outs):
        assert p.returncode == 0, o[-6000:]
    return outs


def popen(h, i, argv, **kw):
    return h.popen(i, argv, cwd=REPO, env=env(**kw), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def hostfile(h, tmp_path) -> str:
    f = tmp_path / "hostfile"
    f.write_text("".join(f"{h.hostname(i)} slots=2\n" for i in range(h.n)))
    return str(f)


def deepspeed_no_ssh(h, tmp_path, args) -> list[subprocess.Popen]:
    hf, port = hostfile(h, tmp_path), str(free_port())
    return [popen(h, i, [str(BIN / "deepspeed"), "--hostfile", hf, "--no_ssh", "--num_nodes", "2", "--node_rank", str(i),
                         "--master_addr", h.hostname(0), "--master_port", port] + args) for i in range(2)]


def torchrun(h, args, *, elastic=False, restarts=0, last_call=60) -> list[subprocess.Popen]:
    port = str(free_port())
    if elastic:
        rdzv = ["--nnodes", "1:2", "--rdzv_backend", "c10d", "--rdzv_endpoint", f"{h.hostname(0)}:{port}",
                "--rdzv_id", f"molm{port}", "--rdzv_conf", f"last_call_timeout={last_call}", "--max-restarts", str(restarts)]
        return [popen(h, i, [str(BIN / "torchrun"), "--nproc_per_node", "2"] + rdzv + args) for i in range(2)]
    return [popen(h, i, [str(BIN / "torchrun"), "--nnodes", "2", "--nproc_per_node", "2", "--node_rank", str(i),
                         "--master_addr", h.hostname(0), "--master_port", port] + args) for i in range(2)]


def mpirun(h, tmp_path, args) -> subprocess.Popen:
    agent = f"{sys.executable} {REPO / 'scripts' / 'hosts.py'} rsh"
    return popen(h, 0, [str(BIN / "mpirun"), "--allow-run-as-root", "-np", "4", "--hostfile", hostfile(h, tmp_path),
                        "--mca", "plm_rsh_agent", agent, "-x", "DS_ACCELERATOR", "-x", "PYTHONPATH", "-x", "PATH",
                        "-x", "OMP_NUM_THREADS", sys.executable] + args)


def ckpt_files(run_dir) -> dict[str, int]:
    root = Path(run_dir, "checkpoints")
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()
            and p.name != "COMPLETE"}  # the marker records times


def assert_same_run(run_dir, ref_dir, steps=range(1, STEPS + 1), *, files=True):
    got, want = read_metrics(run_dir), read_metrics(ref_dir)
    assert sorted(got) == list(steps)
    for s in steps:
        for key in ("loss", "grad_norm"):
            assert got[s][key] == pytest.approx(want[s][key], rel=1e-5, abs=1e-6), (s, key, got[s][key], want[s][key])
    if files:  # written once: the same files, the same sizes as one host writes (no host writes its own copy)
        assert ckpt_files(run_dir) == ckpt_files(ref_dir)


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    return write_shard(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def one_host(shard, tmp_path_factory):
    """The reference: the same job on one host, 4 ranks, ep_size 4 (checkpoints at steps 2 and 4)."""
    run_dir = tmp_path_factory.mktemp("one_host") / "run"
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "4", "--master_port", str(free_port())] + job_args(shard, run_dir)
    p = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode == 0, (p.stdout + p.stderr)[-6000:]
    return run_dir


def test_deepspeed_no_ssh_two_hosts_and_resume_across_hosts(hosts2, shard, one_host, tmp_path):
    h = hosts2
    outs = finish(deepspeed_no_ssh(h, tmp_path, job_args(shard, tmp_path / "a")))
    assert "rank 0 of 4" in outs[0] and "rank 3 of 4" in outs[1]
    assert "network: eth0" in outs[0] and "network: eth0" in outs[1]  # not lo, though the host names say 127.0.1.1
    assert_same_run(tmp_path / "a", one_host)
    # resume the step-2 checkpoint across the hosts: steps 3 and 4 as the straight run
    ck = tmp_path / "a" / "checkpoints" / "step_00000002"
    finish(deepspeed_no_ssh(h, tmp_path, job_args(shard, tmp_path / "b", f"resume={ck}")))
    assert_same_run(tmp_path / "b", one_host, steps=(3, 4), files=False)


def test_mpirun_across_hosts(hosts2, shard, one_host, tmp_path):
    out = finish([mpirun(hosts2, tmp_path, job_args(shard, tmp_path / "m"))])[0]
    assert "launcher: mpi" in out and "rank 3 of 4" in out
    assert_same_run(tmp_path / "m", one_host)


def test_torchrun_static_and_elastic_across_hosts(hosts2, shard, one_host, tmp_path):
    finish(torchrun(hosts2, job_args(shard, tmp_path / "s")))
    assert_same_run(tmp_path / "s", one_host)
    outs = finish(torchrun(hosts2, job_args(shard, tmp_path / "e"), elastic=True))
    assert "rank 3 of 4" in "".join(outs)
    assert_same_run(tmp_path / "e", one_host)
