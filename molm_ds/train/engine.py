"""The DeepSpeed engine of a job: parameter groups, the optimizer, ``deepspeed.initialize``.

AdamW from the job's ``training`` section (DeepSpeedCPUAdam when the ds_config offloads the
optimizer); groups come from the recipe and are split by DeepSpeed's MoE helper (expert parameters in
``'moe': True`` groups); every group carries ``base_lr``, which the schedule scales each step.
"""

from __future__ import annotations

import torch

from molm_ds.train.balance import keep_bias_fp32
from molm_ds.train.ds_config import offloads_optimizer
from molm_ds.train.job import JobConfig
from molm_ds.train.schedule import lr_factor

__all__ = ["build_engine", "build_optimizer", "compile_model", "set_lr"]


def build_optimizer(job: JobConfig, groups: list[dict], ds_cfg: dict) -> torch.optim.Optimizer:
    t = job.training
    kw = dict(lr=t.lr, betas=tuple(t.betas), eps=t.eps, weight_decay=t.weight_decay)
    if offloads_optimizer(ds_cfg):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kw)
    return torch.optim.AdamW(groups, **kw)


def build_engine(job: JobConfig, recipe, model: torch.nn.Module, ds_cfg: dict):
    """``deepspeed.initialize`` on the (already expert-parallel) model; returns the engine."""
    import deepspeed

    from molm_ds.parallel import build_param_groups, guard_plain_optimizer

    groups = build_param_groups(recipe.param_groups(model))
    for g in groups:
        g.setdefault("base_lr", job.training.lr)
    optimizer = build_optimizer(job, groups, ds_cfg)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_cfg, dist_init_required=False)
    guard_plain_optimizer(engine)
    keep_bias_fp32(engine.module)
    return engine


def compile_model(engine, job: JobConfig) -> None:
    """``training.compile``: torch.compile the model's ``forward`` in place, whole (``fullgraph``; the
    backward is compiled with it by AOTAutograd). Parameter names, DeepSpeed's gradient hooks, the MoE
    checkpoint layout and the monitor's forward hooks see the same module.

    Not through DeepSpeed's ``engine.compile``: it compiles the module's whole call, DeepSpeed's own
    forward pre/post hooks included (its throughput timer reads ``time.time()``), which ``fullgraph``
    refuses. Under expert parallelism the all-to-all split sizes are read from the device once per plan;
    ``capture_scalar_outputs`` keeps them in the graph as symbolic sizes (the exchange is then torch's
    traceable functional all-to-all: ``molm_ds.parallel.all_to_all``), so that graph does not break either."""
    import torch._dynamo

    t = job.training
    if job.parallel.ep_size > 1:
        torch._dynamo.config.capture_scalar_outputs = True
    model = engine.module
    model.forward = torch.compile(model.forward, backend=t.compile_backend, fullgraph=True)


def set_lr(engine, job: JobConfig, step: int) -> float:
    """Warmup + cosine factor of ``step`` applied to every group's ``base_lr``; returns the factor."""
    t = job.training
    factor = lr_factor(step, warmup_steps=t.warmup_steps, total_steps=t.steps, min_ratio=t.min_lr_ratio)
    for g in engine.optimizer.param_groups:
        g["lr"] = g.get("base_lr", t.lr) * factor
    return factor
