"""Process-group start-up for every launcher, on one host or many.

Rank and world come from whichever launcher started the process:

- ``deepspeed`` launcher (one node, hostfile/pdsh or ``--no_ssh --node_rank``) and ``torchrun``: RANK,
  WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT are already set.
- ``srun`` (Slurm): SLURM_PROCID, SLURM_NTASKS (SLURM_STEP_NUM_TASKS inside a step) and SLURM_LOCALID;
  MASTER_ADDR is the first host of the step's node list and MASTER_PORT 20000 + job id % 20000, unless
  exported.
- ``mpirun`` (OpenMPI): ranks come from mpi4py (COMM_WORLD); rank 0 broadcasts MASTER_ADDR (127.0.0.1
  when all ranks share a host, else an address of its own that other hosts can reach, unless MASTER_ADDR
  is exported with ``-x``) and a free MASTER_PORT (unless exported); LOCAL_RANK counts ranks on the
  same host.
- plain ``python``: a one-rank group on 127.0.0.1; MASTER_PORT 0 (unless exported) lets the store bind an
  ephemeral port itself, so two single-process jobs never race for a port picked in advance.

**The network interface.** gloo binds to the address its host's name resolves to unless told otherwise,
and on many Debian/Ubuntu machines that is a loopback address (``127.0.1.1``): ranks on other hosts then
cannot connect ("connectFullMesh failed ... remote=[127.0.0.1]"). So every rank finds, by itself, the
interface its kernel routes MASTER_ADDR through and exports it as GLOO_SOCKET_IFNAME (every gloo group,
the CPU control group beside NCCL included) and NCCL_SOCKET_IFNAME (NCCL's bootstrap and socket
transport); a value already in the environment wins. Where MASTER_ADDR is this host and the job spans
hosts, the one interface with a non-loopback address is taken (or the default route's); when that is
ambiguous the rank stops with one line naming the variable to set.

**Timeouts.** Start-up (rendezvous, and connecting every group made while the model is built) may
wait ``max(collective_timeout_s, 300)`` seconds for late ranks; once training starts
(:func:`apply_collective_timeout`) every collective of every group gives up after
``collective_timeout_s`` (``parallel.collective_timeout_s`` in the job), so a lost peer ends the job
instead of hanging it (``molm_ds.parallel.peers`` turns the failure into one line).

On the CPU accelerator DeepSpeed JIT-compiles a shared-memory all-reduce op at start-up (minutes on a
small machine, and rebuilt whenever another process built it with other flags). gloo alone is
correct, so molm-ds skips that op unless ``MOLM_DS_CPU_SHM_COMM=1`` asks for it.
"""

from __future__ import annotations

import os
import re
import socket
from datetime import timedelta
from typing import Optional

from molm_ds.log import get_logger
from molm_ds.parallel.groups import skip_cpu_shm_comm
from molm_ds.parallel.network import NetworkError, interface_for, interfaces, outward_address, set_socket_ifname

log = get_logger("train.distributed")

__all__ = ["init_distributed", "launcher_kind", "rank_env", "free_port", "skip_cpu_shm_comm", "NetworkError",
           "interfaces", "interface_for", "first_host", "apply_collective_timeout", "DEFAULT_COLLECTIVE_TIMEOUT_S",
           "STARTUP_TIMEOUT_S", "elastic_store_warning"]

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
DEFAULT_COLLECTIVE_TIMEOUT_S = 600.0  # a large model's step plus a checkpoint save's skew between ranks, on GPUs
STARTUP_TIMEOUT_S = 300.0  # ranks of a multi-host job start minutes apart (imports, container pulls)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_kind() -> str:
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return "env"
    if "OMPI_COMM_WORLD_SIZE" in env or "PMI_SIZE" in env or "PMIX_RANK" in env and "SLURM_PROCID" not in env:
        return "mpi"
    if all(k in env for k in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")):
        return "slurm"
    return "single"


# --- launchers ------------------------------------------------------------------------------------------

def _mpi_env() -> None:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    hosts = comm.allgather(MPI.Get_processor_name())
    local_rank = sum(h == hosts[rank] for h in hosts[:rank])
    addr = port = None
    if rank == 0:
        try:
            addr = os.environ.get("MASTER_ADDR") or ("127.0.0.1" if len(set(hosts)) == 1 else outward_address())
        except NetworkError as e:
            addr = e  # every rank learns it, so none waits for a rendezvous that never comes
        port = os.environ.get("MASTER_PORT") or str(free_port())
    addr, port = comm.bcast((addr, port), root=0)
    if isinstance(addr, NetworkError):
        raise addr
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(local_rank),
                      MASTER_ADDR=addr, MASTER_PORT=port, LOCAL_WORLD_SIZE=str(hosts.count(hosts[rank])))


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: ``node[03-05,9],gpu1`` -> ``node03``."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise ValueError(f"not a Slurm node list: {nodelist!r}")
    prefix, ranges = m.group(1), m.group(2)
    return prefix + ranges.split(",")[0].split("-")[0] if ranges else prefix


def _slurm_env() -> None:
    env = os.environ
    world = env.get("SLURM_STEP_NUM_TASKS") or env["SLURM_NTASKS"]
    update = dict(RANK=env["SLURM_PROCID"], WORLD_SIZE=world, LOCAL_RANK=env["SLURM_LOCALID"])
    if not env.get("MASTER_ADDR"):
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if not nodes:
            raise NetworkError("Slurm set SLURM_PROCID but no node list; export MASTER_ADDR (the first node's name)")
        update["MASTER_ADDR"] = first_host(nodes)
    if not env.get("MASTER_PORT"):
        update["MASTER_PORT"] = str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
    if env.get("SLURM_STEP_TASKS_PER_NODE", "").isdigit():  # e.g. "4" (uneven steps read "4(x2),3")
        update["LOCAL_WORLD_SIZE"] = env["SLURM_STEP_TASKS_PER_NODE"]
    env.update(update)


def rank_env() -> str:
    """Fill RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT from the launcher; returns its kind."""
    kind = launcher_kind()
    if kind == "mpi":
        _mpi_env()
    elif kind == "slurm":
        _slurm_env()
    elif kind == "single":
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT") or "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    return kind


def elastic_store_warning() -> Optional[str]:
    """Why a restart of this elastic torchrun job may hang, or None. torchrun's agent shares its rendezvous
    store with the workers and keeps it across restarts, so a restarted world reads the addresses of the
    world before (pytorch#135712)."""
    env = os.environ
    restarts = env.get("TORCHELASTIC_MAX_RESTARTS", "0")
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or not restarts.isdigit() or int(restarts) == 0:
        return None
    return ("torchrun shares one store with every world it restarts: a restarted world can wait in gloo/NCCL "
            "start-up for the ranks of the world before; export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for torchrun "
            "(docs/multinode.md, torchrun)")


def _default_timeout(timeout: timedelta) -> None:
    """Groups made from now on (DeepSpeed's expert-parallel groups, the control group) take ``timeout``."""
    import torch.distributed.distributed_c10d as c10d

    c10d.default_pg_timeout = timeout
    if isinstance(getattr(c10d, "default_pg_nccl_timeout", None), timedelta):
        c10d.default_pg_nccl_timeout = timeout


def apply_collective_timeout(timeout_s: float) -> None:
    """From now on every collective of every group of this rank gives up after ``timeout_s``. Called once
    every group exists: until then connecting a new group may wait for late ranks as long as start-up."""
    import torch.distributed.distributed_c10d as c10d

    timeout = timedelta(seconds=timeout_s)
    for pg in list(c10d._world.pg_map):
        try:
            c10d._set_pg_timeout(timeout, pg)
        except ValueError:  # a group this rank is not in
            pass
    _default_timeout(timeout)


def init_distributed(collective_timeout_s: Optional[float] = None) -> tuple[int, int]:
    """Start the default process group for whichever launcher started us; returns (rank, world_size).

    Start-up and the groups made afterwards wait up to ``max(collective_timeout_s, STARTUP_TIMEOUT_S)``;
    :func:`apply_collective_timeout` then bounds every collective by ``collective_timeout_s``."""
    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    kind = launcher_kind()
    timeout_s = DEFAULT_COLLECTIVE_TIMEOUT_S if collective_timeout_s is None else float(collective_timeout_s)
    if not dist.is_initialized():
        kind = rank_env()
        warning = elastic_store_warning()
        if warning and os.environ["RANK"] == "0":
            log.warning(warning)
        ifname = set_socket_ifname() if int(os.environ["WORLD_SIZE"]) > 1 else None
        acc = get_accelerator()
        if acc.device_name() != "cpu":
            acc.set_device(int(os.environ["LOCAL_RANK"]))
        else:
            skip_cpu_shm_comm()
        startup = timedelta(seconds=max(timeout_s, STARTUP_TIMEOUT_S))
        deepspeed.init_distributed(dist_backend=acc.communication_backend_name(), auto_mpi_discovery=False,
                                   verbose=False, timeout=startup)
        _default_timeout(startup)  # the groups made while building; apply_collective_timeout shortens them all
        if ifname:
            log.info("network: %s (GLOO_SOCKET_IFNAME=%s NCCL_SOCKET_IFNAME=%s), master %s:%s", ifname,
                     os.environ["GLOO_SOCKET_IFNAME"], os.environ["NCCL_SOCKET_IFNAME"], os.environ["MASTER_ADDR"],
                     os.environ["MASTER_PORT"])
    rank, world = dist.get_rank(), dist.get_world_size()
    log.info("process group: rank %d of %d (launcher: %s, backend %s)", rank, world, kind, dist.get_backend())
    return rank, world
