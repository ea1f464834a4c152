"""The one door to the network for everything but the expert all-to-all.

Every collective of the trainer, evaluation, continual learning, pruning statistics and the monitor
goes through here (a test bans ``torch.distributed`` collectives anywhere else outside
``molm_ds/parallel/``). Two rules make them safe on every backend:

- tensors are moved to the backend's device before the collective and back afterwards (NCCL takes
  only CUDA tensors, gloo only CPU ones), so a caller can hand over a tensor wherever it lives;
- every metric declares how it reduces (``ReduceOp``, OLMo-core's ``record_metric`` habit), so nobody
  sums a learning rate or averages a token count by accident. The sequence of collectives depends only
  on the names and their ops, never on values, so ranks cannot hang on a data-dependent branch.

Without an initialised process group every function is the identity (a single process is its own
reduction), so the same code runs in plain scripts and tests.
"""

from __future__ import annotations

import enum
from typing import Any, Mapping, Optional

import torch
import torch.distributed as dist

__all__ = [
    "ReduceOp", "initialized", "world_size", "rank", "comm_device", "all_reduce", "reduce_metrics",
    "barrier", "broadcast_object", "all_gather_object", "init_control_group", "any_rank", "shutdown",
]


class ReduceOp(str, enum.Enum):
    MEAN = "mean"  # average over ranks (per-rank losses of equal-sized micro-batches)
    SUM = "sum"  # total over ranks (token counts, loss sums)
    MAX = "max"  # worst rank (step time, memory, a non-finite flag)
    MIN = "min"
    RANK0 = "rank0"  # already identical on every rank (lr, global grad norm, loss scale): no collective


_TORCH_OPS = {
    ReduceOp.MEAN: dist.ReduceOp.SUM,
    ReduceOp.SUM: dist.ReduceOp.SUM,
    ReduceOp.MAX: dist.ReduceOp.MAX,
    ReduceOp.MIN: dist.ReduceOp.MIN,
}


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size(group=None) -> int:
    return dist.get_world_size(group) if initialized() else 1


def rank(group=None) -> int:
    return dist.get_rank(group) if initialized() else 0


def comm_device(group=None) -> torch.device:
    """Where tensors for this group's collectives must live (CUDA for NCCL, CPU for gloo)."""
    if initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(x: torch.Tensor, op: ReduceOp = ReduceOp.SUM, group=None) -> torch.Tensor:
    """Reduce a copy of ``x`` over ``group`` (default: world) on the backend's device; returns it on
    x's device and dtype. ``x`` itself is never changed, so callers may pass an autograd-free view."""
    op = ReduceOp(op)
    if op is ReduceOp.RANK0 or not initialized():
        return x.detach().clone()
    buf = x.detach().to(comm_device(group), copy=True)
    dist.all_reduce(buf, op=_TORCH_OPS[op], group=group)
    if op is ReduceOp.MEAN:
        buf = buf / dist.get_world_size(group)
    return buf.to(x.device)


def reduce_metrics(values: Mapping[str, float], ops: Mapping[str, ReduceOp], group=None) -> dict[str, float]:
    """Reduce each value across the ranks of ``group`` with its declared op; host floats in and out.

    One collective per op in use (values of the same op travel in one float64 tensor). A name without
    an op is an error: declare it.
    """
    missing = sorted(set(values) - set(ops))
    if missing:
        raise KeyError(f"no reduce op declared for metric(s) {missing}; pass one of {[o.value for o in ReduceOp]} for each")
    out = {k: float(v) for k, v in values.items()}
    if not initialized():
        return out
    for op in (ReduceOp.MEAN, ReduceOp.SUM, ReduceOp.MAX, ReduceOp.MIN):
        names = sorted(k for k in values if ReduceOp(ops[k]) is op)
        if names:
            buf = all_reduce(torch.tensor([out[k] for k in names], dtype=torch.float64), op, group)
            out.update(zip(names, buf.tolist()))
    return out


def barrier(group=None) -> None:
    if initialized():
        dist.barrier(group=group)


def broadcast_object(obj: Any, src: int = 0, group=None) -> Any:
    """``obj`` of rank ``src`` on every rank (picklable objects; a small control message, not data)."""
    if not initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group, device=comm_device(group))
    return box[0]


def all_gather_object(obj: Any, group=None) -> list:
    """Every rank's ``obj``, in rank order."""
    if not initialized():
        return [obj]
    out: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


_CONTROL = {"group": None, "ready": False}


def init_control_group() -> None:
    """Create (collectively, once) the CPU group for control messages: the default group under gloo, a
    gloo group beside NCCL. Control messages then never wait for the GPU stream."""
    if _CONTROL["ready"] or not initialized():
        return
    _CONTROL["group"] = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    _CONTROL["ready"] = True


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on some rank (a CPU collective: no GPU sync)."""
    if not initialized():
        return bool(flag)
    init_control_group()
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_CONTROL["group"])
    return bool(t.item())


def shutdown() -> None:
    """End the process group (every rank, after its last collective), at a script's normal exit. Left to
    the interpreter's teardown, gloo's worker threads can still hold tensors whose release needs an
    interpreter that is already gone, and the process aborts (SIGABRT, exit status -6) although its job
    succeeded: in a CI run one rank of a coordinated stop did (pytorch PR 179291 describes the crash).
    NCCL asks for the same call before exit."""
    if initialized():
        dist.destroy_process_group()
    _CONTROL.update(group=None, ready=False)
