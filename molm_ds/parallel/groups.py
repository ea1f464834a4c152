"""DeepSpeed process groups for expert parallelism, and the config checks that must fail before any work.

Groups come from DeepSpeed (`deepspeed.utils.groups`, created by its own
`_create_expert_and_data_parallel`): with world W and ep_size P, expert-parallel groups are
consecutive ranks [0..P-1], [P..2P-1], ... (all-to-all runs inside one), and expert-data-parallel
groups are the ranks with the same position in their expert-parallel group (expert gradients are
reduced there). Name: `ep_size_{P}`.
"""

from __future__ import annotations

import os

from typing import Mapping

import torch.distributed as dist

from molm_ds.config import check_ep_world, check_expert_split
from molm_ds.errors import ConfigError
from molm_ds.log import get_logger

__all__ = ["check_expert_parallel", "ensure_distributed", "expert_parallel_groups", "group_name"]

log = get_logger("parallel")


def group_name(ep_size: int) -> str:
    return f"ep_size_{ep_size}"


def check_expert_parallel(*, ep_size: int, world_size: int, expert_counts: Mapping[str, int]) -> None:
    """Raise ConfigError (saying what to change) unless ep_size >= 1 divides world_size and every
    expert-parallel expert count. `expert_counts`: name -> global experts of each EP'd kind/layer."""
    if not isinstance(ep_size, int) or ep_size < 1:
        raise ConfigError(f"ep_size must be a positive integer, got {ep_size!r}")
    check_ep_world(ep_size, world_size)
    for name, n in expert_counts.items():
        check_expert_split(n, ep_size, what=name, hint=" or change the expert count (or replicate the attention experts)")


def skip_cpu_shm_comm() -> None:
    """On the CPU accelerator DeepSpeed JIT-compiles a shared-memory all-reduce op when its comm layer
    starts (minutes on a small machine, rebuilt whenever another process built it with other flags).
    gloo alone is correct, so skip it unless ``MOLM_DS_CPU_SHM_COMM=1``. No effect on other accelerators."""
    if os.environ.get("MOLM_DS_CPU_SHM_COMM", "0") == "1":
        return
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def ensure_distributed() -> None:
    """Make sure torch.distributed and DeepSpeed's comm layer are initialised (DeepSpeed wraps an
    existing torch process group; otherwise it discovers ranks from the launcher / MPI)."""
    import deepspeed

    skip_cpu_shm_comm()
    if dist.is_available() and dist.is_initialized():
        deepspeed.init_distributed(dist_backend=dist.get_backend())
    else:
        deepspeed.init_distributed()


def expert_parallel_groups(ep_size: int):
    """Create (once) and return DeepSpeed's (expert-parallel group, expert-data-parallel group) for
    ep_size on this rank."""
    from deepspeed.utils import groups

    ensure_distributed()
    world = dist.get_world_size()
    check_expert_parallel(ep_size=ep_size, world_size=world, expert_counts={})
    name = group_name(ep_size)
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
        log.info("created DeepSpeed expert groups %s: ep ranks %s, edp ranks %s", name,
                 groups._get_expert_parallel_group_ranks(name), groups._get_expert_data_parallel_group_ranks(name))
    return groups._get_expert_parallel_group(name), groups._get_expert_data_parallel_group(name)
