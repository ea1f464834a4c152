"""Process-group start-up for every launcher.

- ``deepspeed`` launcher (one node, hostfile/pdsh or ``--no_ssh --node_rank``) and ``torchrun``: RANK,
  WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT are already set.
- ``mpirun`` (OpenMPI): ranks come from mpi4py (COMM_WORLD); rank 0 broadcasts MASTER_ADDR (127.0.0.1
  when all ranks share a host, else its resolved hostname, unless MASTER_ADDR is exported with
  ``-x``) and a free MASTER_PORT (unless exported); LOCAL_RANK counts ranks on the same host.
- plain ``python``: a one-rank group on 127.0.0.1; MASTER_PORT 0 (unless exported) lets the store bind an
  ephemeral port itself, so two single-process jobs never race for a port picked in advance.
Then ``deepspeed.init_distributed`` with the accelerator's backend (gloo on ``DS_ACCELERATOR=cpu``).

On the CPU accelerator DeepSpeed JIT-compiles a shared-memory all-reduce op at start-up (minutes on a
small machine, and rebuilt whenever another process built it with other flags). gloo alone is
correct, so molm-ds skips that op unless ``MOLM_DS_CPU_SHM_COMM=1`` asks for it.
"""

from __future__ import annotations

import os
import socket

from molm_ds.log import get_logger
from molm_ds.parallel.groups import skip_cpu_shm_comm

log = get_logger("train.distributed")

__all__ = ["init_distributed", "launcher_kind", "free_port", "skip_cpu_shm_comm"]

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_kind() -> str:
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return "env"
    if "OMPI_COMM_WORLD_SIZE" in os.environ or "PMI_SIZE" in os.environ or "PMIX_RANK" in os.environ:
        return "mpi"
    return "single"


def _mpi_env() -> None:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    hosts = comm.allgather(MPI.Get_processor_name())
    local_rank = sum(h == hosts[rank] for h in hosts[:rank])
    addr = port = None
    if rank == 0:
        addr = os.environ.get("MASTER_ADDR") or (
            "127.0.0.1" if len(set(hosts)) == 1 else socket.gethostbyname(socket.gethostname()))
        port = os.environ.get("MASTER_PORT") or str(free_port())
    addr, port = comm.bcast((addr, port), root=0)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(local_rank),
                      MASTER_ADDR=addr, MASTER_PORT=port)


def init_distributed() -> tuple[int, int]:
    """Start the default process group for whichever launcher started us; returns (rank, world_size)."""
    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    kind = launcher_kind()
    if not dist.is_initialized():
        if kind == "mpi":
            _mpi_env()
        elif kind == "single":
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=os.environ.get("MASTER_PORT") or "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        acc = get_accelerator()
        if acc.device_name() != "cpu":
            acc.set_device(int(os.environ["LOCAL_RANK"]))
        else:
            skip_cpu_shm_comm()
        deepspeed.init_distributed(dist_backend=acc.communication_backend_name(), auto_mpi_discovery=False,
                                   verbose=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    log.info("process group: rank %d of %d (launcher: %s, backend %s)", rank, world, kind, dist.get_backend())
    return rank, world
