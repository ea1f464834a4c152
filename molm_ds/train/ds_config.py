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

from molm_ds.config import check_ep_world
from molm_ds.errors import ConfigError

if TYPE_CHECKING:
    from molm_ds.train.job import JobConfig

__all__ = ["read_ds_config", "build_ds_config", "check_world", "check_keys", "check_value_types", "check_machine",
           "zero_stage", "SUPPORTED_ZERO_STAGES",
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


def _section_model(section: str):
    """DeepSpeed's own pydantic config model of a sub-section."""
    if section == "zero_optimization":
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig as model
    elif section == "bf16":
        from deepspeed.runtime.precision_config import DeepSpeedBF16Config as model
    elif section == "fp16":
        from deepspeed.runtime.precision_config import DeepSpeedFP16Config as model
    elif section in ("offload_optimizer", "offload_param"):
        from deepspeed.runtime.zero import offload_config

        model = (offload_config.DeepSpeedZeroOffloadOptimizerConfig if section == "offload_optimizer"
                 else offload_config.DeepSpeedZeroOffloadParamConfig)
    else:
        raise KeyError(section)
    return model


def _section_keys(section: str) -> set[str]:
    """Valid keys of a sub-section, from DeepSpeed's own pydantic config models (fields and aliases)."""
    return {k for name, f in _section_model(section).model_fields.items() for k in (name, f.alias) if k}


# Top-level scalars and their types (DeepSpeed reads them with plain dict lookups, so a wrong type fails
# late or not at all); every other top-level key DeepSpeed knows is a section (a JSON object).
_TOP_SCALARS = {
    "train_batch_size": int, "train_micro_batch_size_per_gpu": int, "gradient_accumulation_steps": int,
    "gradient_clipping": float, "steps_per_print": int, "wall_clock_breakdown": bool, "memory_breakdown": bool,
    "prescale_gradients": bool, "gradient_predivide_factor": float, "sparse_gradients": bool,
    "zero_allow_untested_optimizer": bool, "zero_force_ds_cpu_optimizer": bool, "dump_state": bool,
    "disable_allgather": bool, "dataloader_drop_last": bool, "communication_data_type": (str, type(None)),
    "seq_parallel_communication_data_type": str, "gradient_allreduce_op": str, "use_data_before_expert_parallelism":
    bool, "graph_harvesting": bool, "vocabulary_size": int, "log_level": str, "managed_gradient_accumulation": bool,
    "disable_python_gc": int, "zero_optimization_stage": int, "lower_precision_safe_modules": list,
    "expert_parallel": (dict, bool),
}
_AUTO_OK = {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"}


def _type_problem(value, kind) -> str | None:
    """None when ``value`` has the JSON type of ``kind`` (int, float, bool, str, list, dict or a tuple of them;
    DeepSpeed's examples write 5e8 for an integer, so an integral float is an int)."""
    import math

    kinds = kind if isinstance(kind, tuple) else (kind,)
    for k in kinds:
        if k is bool and isinstance(value, bool):
            return None
        if k is int and not isinstance(value, bool) and (isinstance(value, int)
                                                         or isinstance(value, float) and value.is_integer()):
            return None
        if k is float and not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value):
            return None
        if k in (str, list, dict, type(None)) and isinstance(value, k):
            return None
    names = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string", list: "a list",
             dict: "an object {...}", type(None): "null"}
    return " or ".join(names[k] for k in kinds)


def _annotation_kind(ann):
    """The JSON kind a DeepSpeed pydantic field annotation wants (None: not checked here)."""
    import enum
    import typing

    from pydantic import BaseModel

    origin = typing.get_origin(ann)
    if origin is typing.Union:
        kinds = [_annotation_kind(a) for a in typing.get_args(ann)]
        if any(k is None for k in kinds):
            return None
        flat = []
        for k in kinds:
            flat += list(k) if isinstance(k, tuple) else [k]
        return tuple(dict.fromkeys(flat))
    if ann is type(None):
        return type(None)
    if isinstance(ann, type):
        if issubclass(ann, bool):
            return bool
        if issubclass(ann, enum.Enum):
            return ann
        if issubclass(ann, int):
            return int
        if issubclass(ann, float):
            return float
        if issubclass(ann, str):
            return str
        if issubclass(ann, BaseModel):
            return dict
    return None


def _check_section_types(section: dict, model, where: str, path: Path) -> None:
    import enum

    fields = {k: f for name, f in model.model_fields.items() for k in (name, f.alias) if k}
    for key, value in section.items():
        f = fields.get(key)
        kind = _annotation_kind(f.annotation) if f is not None else None
        if kind is None:
            continue
        kinds = kind if isinstance(kind, tuple) else (kind,)
        enums = [k for k in kinds if isinstance(k, type) and issubclass(k, enum.Enum)]
        if enums:
            allowed = [m.value for e in enums for m in e]
            ok = (value is None and type(None) in kinds) or any(
                not isinstance(value, bool) and type(value) is type(a) and value == a for a in allowed)
            if not ok:
                raise ConfigError(f"{path}: {where}.{key}={json.dumps(value)} must be one of "
                                  f"{', '.join(json.dumps(a) for a in allowed)} (a JSON number, "
                                  "not a string or a boolean)" if allowed and not isinstance(allowed[0], str) else
                                  f"{path}: {where}.{key}={json.dumps(value)} must be one of "
                                  f"{', '.join(json.dumps(a) for a in allowed)}")
            continue
        want = _type_problem(value, kind)
        if want is not None:
            raise ConfigError(f"{path}: {where}.{key}={json.dumps(value)} must be {want}")


def check_value_types(ds: dict, path: Path) -> None:
    """Refuse values of the wrong JSON type (``"fp16": true``, ``"zero_optimization": "1"``, ``"stage": "1"``,
    ``"bf16": {"enabled": "yes"}``): one ConfigError naming the key. Sections DeepSpeed describes with a
    pydantic model (zero_optimization and its offload blocks, bf16, fp16) are checked field by field
    against that model's types; DeepSpeed itself would coerce or fail late."""
    for key, value in ds.items():
        if key in _TOP_SCALARS:
            if key in _AUTO_OK and value == "auto":
                continue
            want = _type_problem(value, _TOP_SCALARS[key])
            if want is not None:
                raise ConfigError(f"{path}: {key}={json.dumps(value)} must be {want}")
        elif key in DEEPSPEED_TOP_LEVEL_KEYS and not isinstance(value, dict):
            raise ConfigError(f"{path}: {key}={json.dumps(value)} must be an object {{...}} (DeepSpeed reads its keys), "
                              f"e.g. \"{key}\": {{\"enabled\": {'true' if key in ('bf16', 'fp16') else 'false'}}}"
                              if key in ("bf16", "fp16", "amp", "tensorboard", "wandb", "csv_monitor")
                              else f"{path}: {key}={json.dumps(value)} must be an object {{...}} of its settings")
    for section in ("zero_optimization", "bf16", "fp16"):
        if isinstance(ds.get(section), dict):
            _check_section_types(ds[section], _section_model(section), section, path)
    zero = ds.get("zero_optimization") or {}
    for sub in ("offload_optimizer", "offload_param"):
        if isinstance(zero.get(sub), dict):
            _check_section_types(zero[sub], _section_model(sub), f"zero_optimization.{sub}", path)


def check_machine(ds: dict, path: Path) -> None:
    """Refuse what this machine cannot run, before the model is built: NVMe offload needs DeepSpeed's
    async_io op (libaio) and an existing, writable nvme_path."""
    import os

    zero = ds.get("zero_optimization") or {}
    for sub in ("offload_optimizer", "offload_param"):
        block = zero.get(sub) or {}
        if block.get("device") != "nvme":
            continue
        where = f"zero_optimization.{sub}"
        try:
            from deepspeed.ops.op_builder import AsyncIOBuilder

            usable = AsyncIOBuilder().is_compatible(verbose=False)
        except Exception:  # the builder itself missing or failing to probe: not usable here
            usable = False
        if not usable:
            raise ConfigError(f"{path}: {where}.device=\"nvme\" needs DeepSpeed's async_io op (libaio), which this "
                              "machine cannot build (install libaio-dev, then DS_BUILD_AIO=1 pip install deepspeed); "
                              "or offload to \"cpu\"")
        nvme = block.get("nvme_path")
        if not nvme or not os.path.isdir(nvme) or not os.access(nvme, os.W_OK):
            raise ConfigError(f"{path}: {where}.nvme_path={json.dumps(nvme)} must be an existing, writable directory "
                              "on the NVMe drive")


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
    from molm_ds.paths import read_utf8

    try:
        ds = json.loads(read_utf8(str(path), what="ds config", error=ConfigError), object_pairs_hook=_unique_keys(path))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"{path}: a DeepSpeed config must be a JSON object")
    check_keys(ds, path)
    check_value_types(ds, path)
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


_OUTPUT_KEYS = ("output_path", "output_file")


def _contain_outputs(ds: dict, run_dir: str, source: str) -> None:
    """Every file a ds_config block asks DeepSpeed to write (csv_monitor, comet, flops_profiler ...:
    ``output_path`` / ``output_file``) stays inside run_dir: a relative path is taken inside it, an absolute
    one inside it is kept, any other (absolute elsewhere, or climbing out with '..') is refused. (The tensorboard block is the job's own.)"""
    import os

    root = os.path.realpath(run_dir)
    for section, block in ds.items():
        if section == "tensorboard" or not isinstance(block, dict):
            continue
        for key in _OUTPUT_KEYS:
            value = block.get(key)
            if not isinstance(value, str) or not value:
                continue
            target = os.path.realpath(os.path.join(root, value))
            if os.path.commonpath([target, root]) != root:
                raise ConfigError(f"{source}: {section}.{key}={value!r} writes outside run_dir {run_dir}: give a path "
                                  f"relative to run_dir (e.g. {section})")
            block[key] = target


def check_world(job: "JobConfig", world_size: int) -> None:
    """Checks that need the world size (before any model is built)."""
    check_ep_world(job.parallel.ep_size, world_size, what="parallel.ep_size")


def build_ds_config(job: "JobConfig", world_size: int) -> dict:
    """The ds config dict handed to ``deepspeed.initialize``: the job's file, filled and checked."""
    path = job.deepspeed.resolved_path()
    ds = copy.deepcopy(read_ds_config(path))
    check_machine(ds, path)
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
    _contain_outputs(ds, job.run_dir, src)
    ds.setdefault("steps_per_print", 10**9)  # the trainer prints its own progress line
    ds.setdefault("wall_clock_breakdown", False)
    if offloads_optimizer(ds):
        # The trainer builds DeepSpeedCPUAdam itself for offload; let DeepSpeed accept a client optimizer.
        ds.setdefault("zero_force_ds_cpu_optimizer", False)
    return ds
