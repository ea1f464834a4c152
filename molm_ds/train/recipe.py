"""Recipes: what a kind of job plugs into the one training loop.

The loop (``molm_ds.train.loop.train``) is the same for every job; a ``Recipe`` says what differs:

    check()                          checks before any model is built (raise a UserError)
    build_model()                    the plain, full model (same weights on every rank)
    param_groups(model)              optimizer groups (after expert parallelism sliced the experts)
    loss_terms(model, batch, out)    named (weight, value) terms: loss = CE + sum(weight * value);
                                     every term is logged, whatever its weight
    start(run) / evaluate(run) / finish(run, step)
                                     extra metrics before the first step, at each evaluation, at the end

``Recipe`` itself is pretraining, an ``init_from`` warm start and load-concentration fine-tuning (a
loss weight). Continual learning (``molm_ds.continual.recipe.ContinualRecipe``) subclasses it; this module
never imports it (dependencies point from ``continual`` to ``train``). ``molm_ds.jobs.recipe_for``
picks the recipe of a job.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from molm_ds.model.moe import AUX_KEYS
from molm_ds import checkpoint as ckpt
from molm_ds.train.job import JobConfig

__all__ = ["Recipe", "Run", "decay_groups"]


@dataclass
class Run:
    """What recipe hooks may use once the engine exists: the engine, its module, the device and the data."""

    job: JobConfig
    engine: Any
    device: torch.device
    data: Any  # molm_ds.train.data.TrainData
    rank: int
    world: int

    @property
    def model(self) -> nn.Module:
        return self.engine.module


def decay_groups(params, weight_decay: float, **extra) -> list[dict]:
    """Weight decay on matrices and stacked experts, none on norms and biases (GPT-2 / nanoGPT habit)."""
    decay, no_decay = [], []
    for p in params:
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"name": "decay", "params": decay, "weight_decay": weight_decay, **extra},
              {"name": "no_decay", "params": no_decay, "weight_decay": 0.0, **extra}]
    return [g for g in groups if g["params"]]


class Recipe:
    """Pretraining (and ``init_from`` warm starts, and ``finetune`` load concentration)."""

    name = "pretrain"

    def __init__(self, job: JobConfig) -> None:
        self.job = job
        self.weights = self.loss_weights()

    # ---- before any work ---------------------------------------------------------------------
    def check(self) -> None:
        if self.job.init_from is not None:
            d, tag = ckpt.resolve(self.job.init_from, what="init_from")
            ckpt.check_same_model(ckpt.model_config(d, tag), self.job.model.build(),
                                  where=f"{d}/{tag}", what="init_from")
            problem = ckpt.verify(d, tag, collective=True)
            if problem is not None:
                raise ckpt.CheckpointError(f"init_from: {problem}")

    # ---- build -------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        from molm_ds.model import build_model

        if self.job.init_from is not None:
            return ckpt.load_fp32_model(self.job.init_from, what="init_from", check=False)  # fp32 masters of bf16 runs
        # on a GPU: built there (meta device, one init); fp32, which DeepSpeed's bf16 masters start from
        return build_model(self.job.build_model_config(), device=_train_device())

    def param_groups(self, model: nn.Module) -> list[dict]:
        return decay_groups(model.parameters(), self.job.training.weight_decay, base_lr=self.job.training.lr)

    # ---- the loss ----------------------------------------------------------------------------
    def loss_weights(self) -> dict[str, float]:
        w = self.job.training.loss_weights.model_dump()
        if self.job.finetune is not None:  # load concentration H(m), on top of the other terms
            w["load_concentration"] += self.job.finetune.load_concentration_weight
        return w

    def loss_terms(self, model: nn.Module, batch: dict, out) -> dict[str, tuple[float, Tensor]]:
        """The router aux terms of this micro-batch with their weights (MI, load concentration, Switch, z)."""
        return {k: (self.weights[k], out.aux[k]) for k in AUX_KEYS}

    # ---- extra metrics -----------------------------------------------------------------------
    def start(self, run: Run, *, resumed: bool) -> dict[str, float]:
        return {}

    def evaluate(self, run: Run) -> dict[str, float]:
        return {}

    def finish(self, run: Run, step: int) -> dict[str, float]:
        return {}


def _train_device() -> torch.device:
    """This rank's device (DeepSpeed's accelerator and LOCAL_RANK), where the model is built."""
    import os

    from deepspeed.accelerator import get_accelerator

    name = get_accelerator().device_name()
    return torch.device("cpu") if name == "cpu" else torch.device(name, int(os.environ.get("LOCAL_RANK", 0)))
