"""Which rank of how many this data_prep process is, and the few messages its ranks exchange.

``mpirun -np N`` (OpenMPI), ``srun -n N`` (Slurm) and other PMI launchers say so in the environment;
``detect()`` reads it and, for more than one rank, talks through mpi4py's ``COMM_WORLD``. A process
started without a launcher is rank 0 of 1 and never imports MPI. The data commands exchange only
small Python objects (a plan, per-rank results), so ``bcast`` and ``allgather`` are all there is.
"""

from __future__ import annotations

import dataclasses
import os
import time

from molm_ds.errors import ConfigError

# (rank variable, size variable) per launcher, first match wins
LAUNCHER_ENV = (
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),  # OpenMPI mpirun
    ("PMIX_RANK", "OMPI_COMM_WORLD_SIZE"),  # PMIx launchers that also set the OpenMPI size
    ("PMI_RANK", "PMI_SIZE"),  # MPICH / Intel MPI hydra, Slurm --mpi=pmi2
    ("SLURM_PROCID", "SLURM_NTASKS"),  # srun
)


def from_env(env=None) -> tuple[int, int]:
    """(rank, size) as the launcher's environment gives them; (0, 1) without a launcher."""
    env = os.environ if env is None else env
    for rank_var, size_var in LAUNCHER_ENV:
        if rank_var in env and size_var in env:
            try:
                rank, size = int(env[rank_var]), int(env[size_var])
            except ValueError:
                raise ConfigError(f"{rank_var}={env[rank_var]!r} / {size_var}={env[size_var]!r} are not whole "
                                  "numbers; unset them or start the command with its launcher") from None
            if not 0 <= rank < size:
                raise ConfigError(f"{rank_var}={rank} is not below {size_var}={size}; unset them or start the "
                                  "command with its launcher")
            return rank, size
    return 0, 1


@dataclasses.dataclass
class Ranks:
    rank: int = 0
    size: int = 1
    comm: object = None  # mpi4py COMM_WORLD when size > 1

    def bcast(self, obj, root: int = 0):
        if self.comm is None:
            return obj
        self._wait_for_all()
        return self.comm.bcast(obj, root=root)

    def allgather(self, obj) -> list:
        if self.comm is None:
            return [obj]
        self._wait_for_all()
        return self.comm.allgather(obj)

    def _wait_for_all(self, poll_s: float = 0.02) -> None:
        """Return once every rank got here, sleeping meanwhile: MPI's blocking calls spin on a core while
        they wait, which takes it from the ranks still tokenising on the same machine."""
        req = self.comm.Ibarrier()
        while not req.Test():
            time.sleep(poll_s)


def detect(env=None) -> Ranks:
    """This process's rank; MPI is initialised only when the launcher started more than one rank."""
    rank, size = from_env(env)
    if size == 1:
        return Ranks()
    try:
        from mpi4py import MPI
    except ImportError:
        raise ConfigError(f"started as rank {rank} of {size}, but mpi4py is not installed: pip install mpi4py "
                          "(built against the launcher's MPI), or run one process") from None
    comm = MPI.COMM_WORLD
    if comm.Get_size() != size or comm.Get_rank() != rank:
        raise ConfigError(f"the launcher says rank {rank} of {size} but MPI says rank {comm.Get_rank()} of "
                          f"{comm.Get_size()}: under Slurm start it with srun --mpi=pmix (or pmi2), matching "
                          "the MPI that mpi4py was built with")
    return Ranks(rank, size, comm)
