"""DeepSpeed JSON: read a ds_configs file, refuse what this trainer cannot run, fill it from the job.

The job owns the batch size, gradient clipping, optimizer, schedule and TensorBoard location. A ds
config may leave the batch keys and ``gradient_clipping`` out (they are filled from the job) or set
them (they must then agree with the job; the error says which value to change). ``optimizer`` and
``scheduler`` blocks are refused: the trainer builds AdamW from the job's ``training`` section.
"""

from __future__ import annotations

import copy
import difflib
import json
from pathlib import Path
from typing import TYPE_CHECKING

from molm_ds.errors import ConfigError

if TYPE_CHECKING:
    from molm_ds.train.job import JobConfig

__all__ = ["read_ds_config", "build_ds_config", "check_world", "check_keys", "zero_stage", "SUPPORTED_ZERO_STAGES",
           "DEEPSPEED_TOP_LEVEL_KEYS"]

SUPPORTED_ZERO_STAGES = (0, 1, 2)
JOB_OWNED = {"optimizer": "training.lr / weight_decay / betas / eps", "scheduler": "training.warmup_steps and min_lr_ratio"}

# The top-level keys DeepSpeed 0.19 reads (runtime/config.py and the config classes it builds). DeepSpeed
# ignores any other key without a word, so a typo such as `zero_optimisation` would silently train ZeRO-0.
DEEPSPEED_TOP_LEVEL_KEYS = frozenset({
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
    "managed_gradient_accumulation", "optimizer", "scheduler", "fp16", "bf16", "amp", "torch_autocast",
    "gradient_clipping", "zero_optimization", "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer",
    "communication_data_type", "seq_parallel_communication_data_type", "prescale_gradients",
    "gradient_predivide_factor", "gradient_allreduce_op", "sparse_gradients", "steps_per_print",
    "wall_clock_breakdown", "memory_breakdown", "dump_state", "disable_allgather", "disable_python_gc",
    "flops_profiler", "activation_checkpointing", "sparse_attention", "tensorboard", "wandb", "csv_monitor",
    "comet", "elasticity", "checkpoint", "data_types", "pipeline", "aio", "compression_training",
    "data_efficiency", "curriculum_learning", "autotuning", "nebula", "weight_quantization", "compile",
    "timers", "eigenvalue", "progressive_layer_drop", "quantize_training", "hybrid_engine",
    "dataloader_drop_last", "use_data_before_expert_parallelism", "expert_parallel", "log_level",
    "lower_precision_safe_modules", "vocabulary_size", "graph_harvesting",
})


def _section_keys(section: str) -> set[str]:
    """Valid keys of a sub-section, from DeepSpeed's own pydantic config models (fields and aliases)."""
    if section == "zero_optimization":
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig as model
    elif section == "bf16":
        from deepspeed.runtime.precision_config import DeepSpeedBF16Config as model
    elif section in ("offload_optimizer", "offload_param"):
        from deepspeed.runtime.zero import offload_config

        model = (offload_config.DeepSpeedZeroOffloadOptimizerConfig if section == "offload_optimizer"
                 else offload_config.DeepSpeedZeroOffloadParamConfig)
    else:
        raise KeyError(section)
    return {k for name, f in model.model_fields.items() for k in (name, f.alias) if k}


def _unknown(keys, valid, where: str, path: Path) -> None:
    bad = sorted(set(keys) - set(valid))
    if bad:
        hints = []
        for k in bad:
            near = difflib.get_close_matches(k, sorted(valid), n=1, cutoff=0.6)
            hints.append(f"{k!r}" + (f" (did you mean {near[0]!r}?)" if near else ""))
        raise ConfigError(f"{path}: unknown DeepSpeed key{'s' if len(bad) > 1 else ''} {', '.join(hints)} in {where}; "
                          "DeepSpeed would ignore it silently: fix or remove it")


def check_keys(ds: dict, path: Path) -> None:
    """Refuse keys DeepSpeed would ignore: the top level, ``zero_optimization`` (and its offload blocks)
    and ``bf16`` are checked against DeepSpeed's own key lists."""
    _unknown(ds, DEEPSPEED_TOP_LEVEL_KEYS, "the top level", path)
    zero = ds.get("zero_optimization")
    if isinstance(zero, dict):
        _unknown(zero, _section_keys("zero_optimization"), "zero_optimization", path)
        for sub in ("offload_optimizer", "offload_param"):
            if isinstance(zero.get(sub), dict):
                _unknown(zero[sub], _section_keys(sub), f"zero_optimization.{sub}", path)
        if zero.get("compute_grad_norm") is False:
            raise ConfigError(f"{path}: zero_optimization.compute_grad_norm=false turns off the non-finite gradient "
                              "check that skips bad steps; remove it")
    if isinstance(ds.get("bf16"), dict):
        _unknown(ds["bf16"], _section_keys("bf16"), "bf16", path)


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def offloads_optimizer(ds: dict) -> bool:
    off = ds.get("zero_optimization", {}).get("offload_optimizer") or {}
    return off.get("device", "none") not in ("none", None)


def _unique_keys(path: Path):
    def hook(pairs):
        out = {}
        for k, v in pairs:
            if k in out:
                raise ConfigError(f"{path}: duplicate key {k!r} (JSON keeps the last one silently); keep one")
            out[k] = v
        return out
    return hook


def read_ds_config(path: str | Path) -> dict:
    """Parse a ds config and refuse ZeRO-3 (DeepSpeed MoE supports stages 0, 1, 2) and job-owned blocks."""
    path = Path(path)
    try:
        ds = json.loads(path.read_text(), object_pairs_hook=_unique_keys(path))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"{path}: a DeepSpeed config must be a JSON object")
    check_keys(ds, path)
    stage = zero_stage(ds)
    if stage not in SUPPORTED_ZERO_STAGES:
        raise ConfigError(f"{path}: zero_optimization.stage={stage} is not supported with MoE models (DeepSpeed's "
                         f"MoE runs with ZeRO stages {', '.join(map(str, SUPPORTED_ZERO_STAGES))}); use stage 2 "
                         "(optionally with offload_optimizer) instead")
    for key, owner in JOB_OWNED.items():
        if key in ds:
            raise ConfigError(f"{path}: remove the {key!r} block; the job sets it ({owner})")
    if ds.get("fp16", {}).get("enabled"):
        raise ConfigError(f"{path}: fp16 is not supported by this trainer; use a bf16 or fp32 ds config")
    return ds


def _fill_or_check(ds: dict, key: str, want, source: str, job_key: str) -> None:
    have = ds.get(key, "auto")
    if have == "auto":
        ds[key] = want
    elif have != want:
        raise ConfigError(f"{source}: {key}={have} disagrees with the job ({job_key} gives {want}); remove {key!r} "
                         f"from the ds config (it is filled from the job) or set it to {want}")


def check_world(job: "JobConfig", world_size: int) -> None:
    """Checks that need the world size (before any model is built)."""
    ep = job.parallel.ep_size
    if world_size % ep:
        raise ConfigError(f"parallel.ep_size={ep} does not divide the world size {world_size}: launch a multiple of "
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
        raise ConfigError(f"{src}: remove the 'tensorboard' block; set monitor.tensorboard / tensorboard_dir in the job")
    ds["tensorboard"] = {"enabled": job.monitor.tensorboard, "output_path": job.tensorboard_dir, "job_name": job.name}
    ds.setdefault("steps_per_print", 10**9)  # the trainer prints its own progress line
    ds.setdefault("wall_clock_breakdown", False)
    if offloads_optimizer(ds):
        # The trainer builds DeepSpeedCPUAdam itself for offload; let DeepSpeed accept a client optimizer.
        ds.setdefault("zero_force_ds_cpu_optimizer", False)
    return ds
