"""Cross-rank reduction of metrics, each with a declared reduce op (OLMo-core's `record_metric` habit).

Every rank must call `reduce_metrics` with the same metric names (same order is not needed: names are
sorted) at the same step; the sequence of collectives depends only on the names and their ops, never
on values, so ranks cannot hang on a data-dependent branch. Without an initialised process group the
values pass through (a single process is its own reduction).
"""

from __future__ import annotations

import enum
from typing import Mapping, Optional

import torch
import torch.distributed as dist

__all__ = ["ReduceOp", "reduce_metrics", "all_reduce_sum", "comm_device", "world_size"]


class ReduceOp(str, enum.Enum):
    MEAN = "mean"  # average over ranks (per-rank losses of equal-sized micro-batches)
    SUM = "sum"  # total over ranks (per-rank token counts, per-rank throughput)
    MAX = "max"  # worst rank (step time, memory)
    MIN = "min"
    RANK0 = "rank0"  # already identical on every rank (lr, global grad norm, loss scale): no collective


def _initialised(group) -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size(group=None) -> int:
    return dist.get_world_size(group) if _initialised(group) else 1


def comm_device(group=None) -> torch.device:
    """Where tensors for this group's collectives must live (CUDA for NCCL, CPU for gloo)."""
    if _initialised(group) and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(x: torch.Tensor, group=None) -> torch.Tensor:
    """SUM all-reduce of a copy of x on the group's device; returns it on x's device."""
    if not _initialised(group):
        return x.clone()
    buf = x.detach().to(comm_device(group), copy=True)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
    return buf.to(x.device)


_TORCH_OPS = {
    ReduceOp.MEAN: dist.ReduceOp.SUM,
    ReduceOp.SUM: dist.ReduceOp.SUM,
    ReduceOp.MAX: dist.ReduceOp.MAX,
    ReduceOp.MIN: dist.ReduceOp.MIN,
}


def reduce_metrics(
    values: Mapping[str, float], ops: Mapping[str, ReduceOp], group: Optional[object] = None
) -> dict[str, float]:
    """Reduce each value across the ranks of `group` (default: world) with its declared op.

    One collective per op in use (values of the same op go in one float64 tensor). A name without an op
    is an error: declare it, so that nobody sums a learning rate or averages a token count by accident.
    """
    missing = sorted(set(values) - set(ops))
    if missing:
        raise KeyError(
            f"no reduce op declared for metric(s) {missing}; pass one of {[o.value for o in ReduceOp]} for each"
        )
    out = {k: float(v) for k, v in values.items()}
    if not _initialised(group):
        return out
    n = dist.get_world_size(group)
    dev = comm_device(group)
    for op in (ReduceOp.MEAN, ReduceOp.SUM, ReduceOp.MAX, ReduceOp.MIN):
        names = sorted(k for k in values if ReduceOp(ops[k]) is op)
        if not names:
            continue
        buf = torch.tensor([out[k] for k in names], dtype=torch.float64, device=dev)
        dist.all_reduce(buf, op=_TORCH_OPS[op], group=group)
        if op is ReduceOp.MEAN:
            buf /= n
        out.update(zip(names, buf.cpu().tolist()))
    return out
