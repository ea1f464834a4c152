"""Rank and world from every launcher's environment (DeepSpeed/torchrun, OpenMPI, Slurm, none), and the
network interface each rank picks for MASTER_ADDR, tested by setting the environment (no processes)."""

import os

import pytest

from molm_ds.parallel import network
from molm_ds.train import distributed as d

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE", "LOCAL_SIZE",
               "CROSS_SIZE", "GROUP_WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "PMI_SIZE",
               "PMIX_RANK", "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


@pytest.fixture
def clean_env(monkeypatch):
    # every variable the code under test may set is recorded here, so the test leaves none behind
    for k in set(LAUNCH_VARS) | {k for k in os.environ if k.startswith("SLURM_")}:
        monkeypatch.setenv(k, "")  # recorded (delenv of an absent name is not), so undo removes what the code sets
        monkeypatch.delenv(k)
    return monkeypatch


def test_slurm_srun_task_maps_to_rank_world_local_rank_and_master(clean_env):
    clean_env.setenv("SLURM_PROCID", "5")
    clean_env.setenv("SLURM_NTASKS", "8")
    clean_env.setenv("SLURM_LOCALID", "1")
    clean_env.setenv("SLURM_JOB_ID", "123456")
    clean_env.setenv("SLURM_JOB_NODELIST", "gpu[07-10],login3")
    clean_env.setenv("SLURM_STEP_TASKS_PER_NODE", "2")
    assert d.launcher_kind() == "slurm"
    assert d.rank_env() == "slurm"
    env = {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    assert env == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu07",
                   "MASTER_PORT": str(20000 + 123456 % 20000), "LOCAL_WORLD_SIZE": "2"}
    assert network.multi_host()


def test_slurm_step_size_and_exported_master_win(clean_env):
    for k, v in dict(SLURM_PROCID="0", SLURM_NTASKS="16", SLURM_STEP_NUM_TASKS="4", SLURM_LOCALID="0",
                     SLURM_STEP_NODELIST="n1", MASTER_ADDR="head", MASTER_PORT="29555").items():
        clean_env.setenv(k, v)
    d.rank_env()
    assert (os.environ["WORLD_SIZE"], os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("4", "head", "29555")


def test_a_launcher_that_sets_rank_wins_over_slurm(clean_env):
    # deepspeed / torchrun inside an sbatch script: SLURM_PROCID is the batch step's, RANK is the truth
    for k, v in dict(SLURM_PROCID="0", SLURM_NTASKS="2", SLURM_LOCALID="0", RANK="3", WORLD_SIZE="4",
                     LOCAL_RANK="1", MASTER_ADDR="10.1.1.1", MASTER_PORT="29500").items():
        clean_env.setenv(k, v)
    assert d.launcher_kind() == "env" and d.rank_env() == "env"
    assert os.environ["RANK"] == "3"


@pytest.mark.parametrize("env, kind", [
    ({"OMPI_COMM_WORLD_SIZE": "2"}, "mpi"),
    ({"PMIX_RANK": "0"}, "mpi"),
    ({"PMIX_RANK": "0", "SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0"}, "slurm"),  # srun --mpi=pmix
    ({}, "single"),
])
def test_launcher_kind(clean_env, env, kind):
    for k, v in env.items():
        clean_env.setenv(k, v)
    assert d.launcher_kind() == kind


def test_single_process(clean_env):
    assert d.rank_env() == "single"
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["MASTER_ADDR"]) == ("0", "1", "127.0.0.1")


@pytest.mark.parametrize("nodes, first", [("node[03-05,9],gpu1", "node03"), ("a1,b2", "a1"), ("gpu7", "gpu7"),
                                          ("rack1-n[2,4]", "rack1-n2")])
def test_first_host_of_a_slurm_node_list(nodes, first):
    assert d.first_host(nodes) == first


@pytest.mark.parametrize("env, multi", [
    ({"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}, True),  # torchrun
    ({"WORLD_SIZE": "4", "LOCAL_SIZE": "4"}, False),  # deepspeed launcher
    ({"WORLD_SIZE": "4", "CROSS_SIZE": "2"}, True),
    ({"WORLD_SIZE": "2"}, False),
])
def test_multi_host_from_the_launchers_local_size(clean_env, env, multi):
    for k, v in env.items():
        clean_env.setenv(k, v)
    assert network.multi_host() is multi


def test_loopback_master_uses_lo_and_explicit_ifname_wins(clean_env):
    assert network.interface_for("127.0.0.1", multi_host=False) == "lo"
    clean_env.setenv("MASTER_ADDR", "127.0.0.1")
    assert network.set_socket_ifname() == "lo"
    assert os.environ["GLOO_SOCKET_IFNAME"] == os.environ["NCCL_SOCKET_IFNAME"] == "lo"
    clean_env.setenv("GLOO_SOCKET_IFNAME", "myif0")
    clean_env.delenv("NCCL_SOCKET_IFNAME")
    assert network.set_socket_ifname() == "myif0"  # no probing once a value is given
    assert os.environ["NCCL_SOCKET_IFNAME"] == "myif0"


def test_unresolvable_master_names_the_variable_to_set():
    with pytest.raises(network.NetworkError, match="set GLOO_SOCKET_IFNAME .*NCCL_SOCKET_IFNAME") as e:
        network.interface_for("no-such-host.invalid", multi_host=True)
    assert "MASTER_ADDR=no-such-host.invalid" in str(e.value) and "\n" not in str(e.value)
    assert e.value.every_rank


def test_global_batch_size_derives_grad_accum_at_every_world_size(tmp_path):
    from molm_ds.train import load_job
    from molm_ds.train.job import JobConfigError
    from molm_ds.testing import TINY_JOB, tiny_job_overrides, write_shard

    shard = write_shard(tmp_path / "data")
    job = load_job(str(TINY_JOB), tiny_job_overrides(shard, tmp_path / "run") + ["training.global_batch_size=16"])
    assert job.training.micro_batch_size == 2
    assert [job.at_world_size(w).training.grad_accum_steps for w in (1, 2, 4, 8)] == [8, 4, 2, 1]
    assert job.at_world_size(4).training.global_batch_size == 16
    with pytest.raises(JobConfigError, match="global_batch_size=16 is not a multiple of micro_batch_size 2 x world size 3"):
        job.at_world_size(3)
    plain = load_job(str(TINY_JOB), tiny_job_overrides(shard, tmp_path / "run"))
    assert plain.at_world_size(4) is plain  # without it, grad_accum_steps is the job's


@pytest.mark.parametrize("env,warns", [
    ({"TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_MAX_RESTARTS": "3"}, True),
    ({"TORCHELASTIC_USE_AGENT_STORE": "False", "TORCHELASTIC_MAX_RESTARTS": "3"}, False),  # the variable is set
    ({"TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_MAX_RESTARTS": "0"}, False),  # nothing restarts
    ({}, False),
])
def test_elastic_torchrun_with_restarts_and_a_shared_store_is_warned(clean_env, monkeypatch, env, warns):
    for k in ("TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_MAX_RESTARTS"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    got = d.elastic_store_warning()
    assert (got is not None) == warns
    if warns:
        assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in got
