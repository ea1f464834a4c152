"""Training across hosts with the commands of docs/multinode.md, as printed (tests/multihost/doc_commands.py):
2 hosts x 2 ranks with the DeepSpeed launcher (--no_ssh, one launcher per host), mpirun (an rsh agent that
enters the namespace instead of ssh), torchrun (static, and elastic rendezvous) and Slurm's srun (its
environment given to each task), expert parallelism spanning the hosts (ep_size 4). Each run's losses
equal a one-host run of the same job, its checkpoint holds the one-host run's files (written once, not
once per host), and a resume across hosts continues exactly. Each host's own name resolves to
127.0.1.1 there, so these fail unless every rank finds the interface that reaches the master itself."""

import importlib.util
import os
import shutil
from pathlib import Path

import pytest

from tests.multihost import doc_commands as doc
from molm_ds.testing import read_metrics, train_in_ranks

pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.multihost]

STEPS = 4
PDSH_STAND_IN = Path(__file__).resolve().parent / "bin"


def ckpt_files(run_dir) -> dict[str, int]:
    """Every checkpoint file, with its size where it holds only tensors: the experts' files (job.yaml, the
    marker, the optimizer shards and mp_rank_00_model_states.pt also carry the run's absolute paths, whose
    length differs from run to run)."""
    root = Path(run_dir, "checkpoints")
    return {str(p.relative_to(root)): p.stat().st_size if p.name.startswith("layer_") else None
            for p in sorted(root.rglob("*")) if p.is_file()}


def assert_same_run(run_dir, ref_dir, steps=range(1, STEPS + 1), *, files=True):
    got, want = read_metrics(run_dir), read_metrics(ref_dir)
    assert sorted(got) == list(steps)
    for s in steps:
        for key in ("loss", "grad_norm"):
            assert got[s][key] == pytest.approx(want[s][key], rel=1e-5, abs=1e-6), (s, key, got[s][key], want[s][key])
    if files:  # written once: the same files of the same sizes as one host writes
        assert ckpt_files(run_dir) == ckpt_files(ref_dir)


@pytest.fixture(scope="module")
def one_host(shard, tmp_path_factory):
    """The reference: the same job on one host, 4 gloo ranks, ep_size 4 (checkpoints at steps 2 and 4)."""
    ws = doc.workspace(tmp_path_factory.mktemp("one_host") / "ws", shard)
    train_in_ranks(ws / "job.yaml", world_size=4)
    return ws / "run"


@pytest.fixture
def nodes(make_hosts):
    return make_hosts(2, names=doc.NAMES)


def test_deepspeed_no_ssh_two_hosts_and_resume_across_hosts(nodes, shard, one_host, tmp_path):
    cmds = doc.commands("deepspeed --hostfile hostfile --no_ssh")
    ws = doc.workspace(tmp_path / "a", shard)
    outs = doc.wait(doc.start(nodes, cmds, ws))
    assert "rank 0 of 4" in outs[0] and "rank 3 of 4" in outs[1]
    assert "network: eth0" in outs[0] and "network: eth0" in outs[1]  # not lo, though the host names say 127.0.1.1
    assert_same_run(ws / "run", one_host)
    # the same commands resume the step-2 checkpoint across the hosts: steps 3 and 4 as the straight run
    ws_b = doc.workspace(tmp_path / "b", shard)
    doc.wait(doc.start(nodes, [(i, c + f" --resume {ws / 'run' / 'checkpoints' / 'step_00000002'}") for i, c in cmds], ws_b))
    assert_same_run(ws_b / "run", one_host, steps=(3, 4), files=False)


def test_mpirun_across_hosts(nodes, shard, one_host, tmp_path):
    ws = doc.workspace(tmp_path / "m", shard)
    out = doc.wait(doc.start(nodes, doc.commands("mpirun"), ws))[0]
    assert "launcher: mpi" in out and "rank 3 of 4" in out
    assert_same_run(ws / "run", one_host)


def test_torchrun_static_and_elastic_across_hosts(nodes, shard, one_host, tmp_path):
    ws = doc.workspace(tmp_path / "s", shard)
    doc.wait(doc.start(nodes, doc.commands("torchrun --nnodes 2"), ws))
    assert_same_run(ws / "run", one_host)
    ws = doc.workspace(tmp_path / "e", shard)  # ep_size 2 and global_batch_size 16 set on its command line
    outs = doc.wait(doc.start(nodes, doc.commands("TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --nnodes 1:2"), ws))
    assert "rank 3 of 4" in "".join(outs)
    assert_same_run(ws / "run", one_host, files=False)  # ep 2: other expert files per rank, same losses


def test_slurm_srun_tasks_across_hosts(nodes, shard, one_host, tmp_path):
    """The sbatch script's srun line as 2 tasks per host, each with the environment srun gives a task."""
    ws = doc.workspace(tmp_path / "slurm", shard)
    cmd = doc.srun_line()
    procs = []
    for node in range(2):
        for local in range(2):
            e = dict(SLURM_PROCID=str(2 * node + local), SLURM_NTASKS="4", SLURM_LOCALID=str(local), SLURM_NNODES="2",
                     SLURM_NODEID=str(node), SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="node[1-2]",
                     SLURM_STEP_TASKS_PER_NODE="2(x2)")
            procs += doc.start(nodes, [(node, cmd)], ws, {node: e})
    outs = doc.wait(procs)
    assert "launcher: slurm" in outs[0] and "master node1:24242" in outs[0]
    assert_same_run(ws / "run", one_host)


def test_deepspeed_hostfile_over_ssh(nodes, shard, one_host, tmp_path):
    """The hostfile line as printed, on node1: DeepSpeed's pdsh runner checks ssh to node1, takes the master
    address from `ssh node1 hostname -I`, and starts each node's launcher over ssh (OpenSSH's client, the
    hosts' ssh servers, a login environment plus .deepspeed_env). pdsh itself is the test's stand-in."""
    if shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
        pytest.skip("needs OpenSSH's client (ssh, ssh-keygen)")
    if importlib.util.find_spec("asyncssh") is None:
        pytest.skip("the hosts' ssh servers need asyncssh (the dev extra)")
    nodes.start_ssh()
    ws = doc.workspace(tmp_path / "ssh", shard)
    (ws / ".deepspeed_env").write_text(
        "".join(f"{k}={doc.env()[k]}\n" for k in ("DS_ACCELERATOR", "OMP_NUM_THREADS", "TORCH_EXTENSIONS_DIR")))
    path = f"{PDSH_STAND_IN}{os.pathsep}{doc.env()['PATH']}"
    out = doc.wait(doc.start(nodes, doc.commands("deepspeed --hostfile hostfile launch/pretrain.py"), ws,
                             {0: {"PATH": path}}))[0]
    assert "node1: " in out and "node2: " in out, out[-3000:]  # each node's launcher ran, over ssh
    assert f"master_addr={nodes.addr(0)}" in out and "rank 3 of 4" in out, out[-3000:]
    assert_same_run(ws / "run", one_host)
