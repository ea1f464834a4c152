"""Auxiliary-loss-free balancing: once per optimizer step, every biased router's bias moves towards equal load.

The routers count their chosen experts in every training forward (``Router.load_E``, see
``molm_ds.model.router``). After the step's last micro-batch, ``update_router_biases`` concatenates the counts
of every biased router into one int64 vector, sums it over all ranks with ONE all-reduce through
``molm_ds.parallel.comm`` (on the device under NCCL: no host sync), applies
``b_m += rate * sign(mean load - load_m)`` to each router and zeroes the counts. So the update sees the
tokens of every micro-batch of the step on every data-parallel rank: the same bias for 1 rank x 4 micro-batches,
4 ranks x 1, or one micro-batch of 4 (the routers are replicated on every rank, expert parallelism or not).

A skipped step (non-finite gradients, the same decision on every rank) changes no weight, so it changes no
bias either; its counts are dropped.
"""

from __future__ import annotations

import torch
from torch import nn

from molm_ds.model.router import Router, bias_update
from molm_ds.parallel import comm

__all__ = ["bias_routers", "keep_bias_fp32", "update_router_biases"]


def bias_routers(model: nn.Module) -> list[Router]:
    """The routers with a balancing bias, in module order (the same order on every rank)."""
    return [m for m in model.modules() if isinstance(m, Router) and m.expert_bias_E is not None]


def keep_bias_fp32(model: nn.Module) -> None:
    """Undo a bf16/fp16 engine's cast of the bias buffers: steps of 1e-3 vanish in bf16 near 1."""
    for r in bias_routers(model):
        if r.expert_bias_E.dtype != torch.float32:
            r.expert_bias_E = r.expert_bias_E.float()


@torch.no_grad()
def update_router_biases(model: nn.Module, *, applied: bool = True) -> None:
    """One step's update of every biased router of ``model`` (collective: call on every rank, every step)."""
    routers = bias_routers(model)
    if not routers:
        return
    loads = [r.load_E if r.load_E is not None else torch.zeros(r.num_experts, dtype=torch.int64,
                                                                device=r.expert_bias_E.device) for r in routers]
    total = comm.all_reduce(torch.cat(loads), comm.ReduceOp.SUM)
    start = 0
    for r in routers:
        n = r.num_experts
        r.last_step_load_E = total[start:start + n]  # for the monitor (molm_ds.monitor.balance)
        if applied:
            r.expert_bias_E.copy_(bias_update(bias_E=r.expert_bias_E, load_E=total[start:start + n], rate=r.bias_rate))
        r.load_E = None
        start += n
