"""DeepSpeed JSON: read a ds_configs file, refuse what this trainer cannot run, fill it from the job.

The job owns the batch size, gradient clipping, optimizer, schedule and TensorBoard location. A ds
config may leave the batch keys and ``gradient_clipping`` out (they are filled from the job) or set
them (they must then agree with the job; the error says which value to change). ``optimizer`` and
``scheduler`` blocks are refused: the trainer builds AdamW from the job's ``training`` section.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from molm_ds.train.job import JobConfig

__all__ = ["read_ds_config", "build_ds_config", "check_world", "zero_stage", "SUPPORTED_ZERO_STAGES"]

SUPPORTED_ZERO_STAGES = (0, 1, 2)
JOB_OWNED = {"optimizer": "training.lr / weight_decay / betas / eps", "scheduler": "training.warmup_steps and min_lr_ratio"}


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def offloads_optimizer(ds: dict) -> bool:
    off = ds.get("zero_optimization", {}).get("offload_optimizer") or {}
    return off.get("device", "none") not in ("none", None)


def read_ds_config(path: str | Path) -> dict:
    """Parse a ds config and refuse ZeRO-3 (DeepSpeed MoE supports stages 0, 1, 2) and job-owned blocks."""
    path = Path(path)
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(ds, dict):
        raise ValueError(f"{path}: a DeepSpeed config must be a JSON object")
    stage = zero_stage(ds)
    if stage not in SUPPORTED_ZERO_STAGES:
        raise ValueError(f"{path}: zero_optimization.stage={stage} is not supported with MoE models (DeepSpeed's "
                         f"MoE runs with ZeRO stages {', '.join(map(str, SUPPORTED_ZERO_STAGES))}); use stage 2 "
                         "(optionally with offload_optimizer) instead")
    for key, owner in JOB_OWNED.items():
        if key in ds:
            raise ValueError(f"{path}: remove the {key!r} block; the job sets it ({owner})")
    if ds.get("fp16", {}).get("enabled"):
        raise ValueError(f"{path}: fp16 is not supported by this trainer; use a bf16 or fp32 ds config")
    return ds


def _fill_or_check(ds: dict, key: str, want, source: str, job_key: str) -> None:
    have = ds.get(key, "auto")
    if have == "auto":
        ds[key] = want
    elif have != want:
        raise ValueError(f"{source}: {key}={have} disagrees with the job ({job_key} gives {want}); remove {key!r} "
                         f"from the ds config (it is filled from the job) or set it to {want}")


def check_world(job: "JobConfig", world_size: int) -> None:
    """Checks that need the world size (before any model is built)."""
    ep = job.parallel.ep_size
    if world_size % ep:
        raise ValueError(f"parallel.ep_size={ep} does not divide the world size {world_size}: launch a multiple of "
                         f"{ep} ranks or choose an ep_size that divides {world_size}")


def build_ds_config(job: "JobConfig", world_size: int) -> dict:
    """The ds config dict handed to ``deepspeed.initialize``: the job's file, filled and checked."""
    path = job.deepspeed.resolved_path()
    ds = copy.deepcopy(read_ds_config(path))
    src = str(path)
    t = job.training
    check_world(job, world_size)
    _fill_or_check(ds, "train_micro_batch_size_per_gpu", t.micro_batch_size, src, "training.micro_batch_size")
    _fill_or_check(ds, "gradient_accumulation_steps", t.grad_accum_steps, src, "training.grad_accum_steps")
    _fill_or_check(ds, "train_batch_size", t.micro_batch_size * t.grad_accum_steps * world_size, src,
                   f"micro_batch_size * grad_accum_steps * world_size {world_size}")
    _fill_or_check(ds, "gradient_clipping", t.grad_clip, src, "training.grad_clip")
    if "tensorboard" in ds:
        raise ValueError(f"{src}: remove the 'tensorboard' block; set monitor.tensorboard / tensorboard_dir in the job")
    ds["tensorboard"] = {"enabled": job.monitor.tensorboard, "output_path": job.tensorboard_dir, "job_name": job.name}
    ds.setdefault("steps_per_print", 10**9)  # the trainer prints its own progress line
    ds.setdefault("wall_clock_breakdown", False)
    if offloads_optimizer(ds):
        # The trainer builds DeepSpeedCPUAdam itself for offload; let DeepSpeed accept a client optimizer.
        ds.setdefault("zero_force_ds_cpu_optimizer", False)
    return ds
