"""One logger for the library, rank-0 helpers and warn-once. Library code logs; scripts print."""

from __future__ import annotations

import functools
import logging
import os
import sys

logger = logging.getLogger("molm_ds")


def get_logger(name: str | None = None) -> logging.Logger:
    return logger.getChild(name) if name else logger


def rank() -> int:
    """Global rank from the launcher's environment (0 when not distributed)."""
    # A process group exists only where torch.distributed was imported; the data commands never import
    # torch, and importing it only to learn that costs them seconds per process.
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    for var in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID"):  # torchrun/DeepSpeed, mpirun, srun
        if var in os.environ:
            return int(os.environ[var])
    return 0


def is_rank0() -> bool:
    return rank() == 0


def print0(*args, **kwargs) -> None:
    """Print on global rank 0 only (for scripts)."""
    if is_rank0():
        print(*args, flush=True, **kwargs)


def info0(msg: str, *args) -> None:
    if is_rank0():
        logger.info(msg, *args)


@functools.lru_cache(maxsize=None)
def warn_once(msg: str) -> None:
    logger.warning(msg)


def setup_logging(level: int = logging.INFO) -> None:
    """Configure the root handler once (scripts call this)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=level, format=f"[%(asctime)s rank{rank()}] %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logger.setLevel(level)
