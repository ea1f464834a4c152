"""One optimizer step: ``grad_accum_steps`` micro-batches of forward -> loss -> backward, then step.

Nothing here reads a tensor value on the host. Every loss term accumulates as one float64 vector on
the device; the step ends with ONE all-reduce of that vector over all ranks (through
``molm_ds.parallel.comm``), and the loop reads it only on logging steps. Whether the step was
applied is DeepSpeed's decision: its ZeRO-1/2 and bf16 optimizers check the gradients for inf/NaN
(through the global gradient norm, identical on every rank) and skip the update on every rank
together; for ZeRO-0 fp32, ``molm_ds.parallel.clip.guard_plain_optimizer`` does the same. The loop
learns it from ``engine.was_step_applied()``, a host bool DeepSpeed already has.

Host syncs of a non-logging step in molm-ds code: the split sizes of each all-to-all dispatch plan (one
per MoE sub-layer and micro-batch under expert parallelism), the per-expert row counts of the CPU
loop path (one per sub-layer and micro-batch; the Triton path reads them on the device); inside
``engine.step()`` DeepSpeed's own gradient-norm / overflow checks. With ``router_balance: bias`` the step
ends with one more all-reduce, of the routers' expert counts (``molm_ds.train.balance``). ``tests/train/test_host_syncs.py``
counts them.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from molm_ds.parallel import comm
from molm_ds.train.balance import update_router_biases
from molm_ds.train.evaluate import lm_loss

__all__ = ["StepSums", "train_step", "total_loss"]


def total_loss(*, lm: Tensor, terms: dict[str, tuple[float, Tensor]]) -> Tensor:
    """CE + sum over terms of weight * value (terms with weight 0 are logged, not added)."""
    loss = lm
    for weight, value in terms.values():
        if weight:
            loss = loss + weight * value.float()
    return loss


class StepSums:
    """Sums of named per-micro-batch scalars on the device; ``reduce`` = one all-reduce -> means."""

    def __init__(self, names: list[str], device: torch.device) -> None:
        self.names = ["loss", "lm_loss", *names, "nonfinite"]
        self.sums = torch.zeros(len(self.names), dtype=torch.float64, device=device)
        self.count = 0

    def add(self, loss: Tensor, lm: Tensor, terms: dict[str, tuple[float, Tensor]]) -> None:
        row = torch.stack([loss.detach().double(), lm.detach().double(), *(v.detach().double() for _, v in terms.values()),
                           (~torch.isfinite(loss.detach())).double()])
        self.sums += row
        self.count += 1

    def reduce(self) -> Tensor:
        """Means over micro-batches and ranks (the non-finite entry: the number of non-finite micro-batches
        over all ranks), still on the device."""
        total = comm.all_reduce(self.sums, comm.ReduceOp.SUM)
        return torch.cat([total[:-1] / (self.count * comm.world_size()), total[-1:]])

    def to_metrics(self, reduced: Tensor) -> dict[str, float]:
        """Host floats of a reduced vector (a host sync: logging steps only)."""
        values = reduced.tolist()
        return dict(zip(self.names, values))


def train_step(engine, next_batch: Callable[[], dict], recipe, device: torch.device, n_micro: int) -> tuple[StepSums, Tensor]:
    """Run one optimizer step on every rank; returns the sums and their reduced means (device tensor)."""
    sums = None
    for _ in range(n_micro):
        batch = next_batch()
        out = engine(batch["input_ids"].to(device))
        lm = lm_loss(logits_BTV=out.logits, labels_BT=batch["labels"].to(device))
        terms = recipe.loss_terms(engine.module, batch, out)
        loss = total_loss(lm=lm, terms=terms)
        engine.backward(loss)
        if sums is None:
            sums = StepSums(list(terms), lm.device)
        sums.add(loss, lm, terms)
        engine.step()  # DeepSpeed steps the optimizer on the last micro-batch only
    update_router_biases(engine.module, applied=engine.was_step_applied())  # once per step, after all micro-batches
    return sums, sums.reduce()
