"""One optimizer step: ``grad_accum_steps`` micro-batches of forward -> loss -> backward, then step.

Nothing here reads a tensor value on the host. Every loss term accumulates as one float64 vector on
the device; the step ends with ONE all-reduce of that vector over all ranks (through
``molm_ds.parallel.comm``), and the loop reads it only on logging steps. Whether the step was
applied is DeepSpeed's decision: its ZeRO-1/2 and bf16 optimizers check the gradients for inf/NaN
(through the global gradient norm, identical on every rank) and skip the update on every rank
together; for ZeRO-0 fp32, ``molm_ds.parallel.clip.guard_plain_optimizer`` does the same. The loop
learns it from ``engine.was_step_applied()``, a host bool DeepSpeed already has.

Batches reach the device by ``micro_batches``: read one micro-batch ahead, pinned on CUDA, copied with
``non_blocking=True``.

Host syncs of a non-logging step: the split sizes of each all-to-all dispatch plan (one per MoE
sub-layer and micro-batch, under expert parallelism only) and the optimizer's skip decision (one host
bool per optimizer step: DeepSpeed's under ZeRO-1/2, ``guard_plain_optimizer``'s under ZeRO-0). With
``router_balance: bias`` the step ends with one more all-reduce, of the routers' expert counts
(``molm_ds.train.balance``), on the device. ``tests/train/test_host_syncs.py`` counts them with
``tests/sync_mode.py`` (docs/training.md).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from molm_ds.parallel import comm
from molm_ds.train.balance import update_router_biases
from molm_ds.train.evaluate import lm_loss

__all__ = ["StepSums", "micro_batches", "train_step", "total_loss"]


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


def _pin(batch: dict, device: torch.device) -> dict:
    """The batch in page-locked host memory when it goes to a CUDA device (so that the copy is
    asynchronous); unchanged otherwise (pinning needs CUDA and buys nothing on the CPU)."""
    if device.type != "cuda":
        return batch
    return {k: v.pin_memory() if isinstance(v, Tensor) else v for k, v in batch.items()}


def _to_device(batch: dict, device: torch.device) -> dict:
    """Copies issued without waiting (``non_blocking``): from pinned memory the host goes on at once."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}


def micro_batches(next_batch: Callable[[], dict], device: torch.device, n: int):
    """The ``n`` micro-batches of one step on ``device``, each read (and pinned, on CUDA) and its copy
    issued one micro-batch ahead, while the device still computes the previous one. Nothing is read
    beyond the step, so the loader's state at a step boundary is exactly that of ``n`` reads per step
    (checkpoints and resume stay exact)."""
    ahead = _to_device(_pin(next_batch(), device), device) if n else None
    for i in range(n):
        batch = ahead
        ahead = _to_device(_pin(next_batch(), device), device) if i + 1 < n else None
        yield batch


def train_step(engine, next_batch: Callable[[], dict], recipe, device: torch.device, n_micro: int) -> tuple[StepSums, Tensor]:
    """Run one optimizer step on every rank; returns the sums and their reduced means (device tensor)."""
    sums = None
    for batch in micro_batches(next_batch, device, n_micro):
        out = engine(batch["input_ids"])
        lm = lm_loss(logits_BTV=out.logits, labels_BT=batch["labels"])
        terms = recipe.loss_terms(engine.module, batch, out)
        loss = total_loss(lm=lm, terms=terms)
        engine.backward(loss)
        if sums is None:
            sums = StepSums(list(terms), lm.device)
        sums.add(loss, lm, terms)
        engine.step()  # DeepSpeed steps the optimizer on the last micro-batch only
    update_router_biases(engine.module, applied=engine.was_step_applied())  # once per step, after all micro-batches
    return sums, sums.reduce()
