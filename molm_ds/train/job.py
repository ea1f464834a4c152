"""The job file: one YAML describes a training run. Validated strictly, saved in every checkpoint.

Sections (each a small pydantic model, unknown keys rejected with the list of valid ones):
``model`` (preset + overrides), ``data`` (sources, seq_len), ``training`` (steps, batch, schedule,
loss weights), ``parallel`` (ep_size), ``deepspeed`` (a ds_configs JSON), ``checkpoint``,
``monitor``, ``resume``, ``init_from`` + ``continual`` (molm_ds.continual), ``finetune`` (load concentration,
molm_ds.prune). ``prune`` is reserved (pruning is ``launch/prune.py``): naming it is an error. Adding a section = a field on ``JobConfig``
plus the one place in ``molm_ds.train.loop`` that consumes it (build_model, param_groups or
loss_weights).

    job = load_job("configs/demo.yaml", overrides=["training.steps=10"])
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from molm_ds.config import ModelConfig, preset_names
from molm_ds.continual.config import ContinualSection, grown_config
from molm_ds.monitor.config import MonitorConfig

__all__ = ["JobConfig", "JobConfigError", "load_job", "parse_overrides", "apply_overrides", "REPO_ROOT"]

REPO_ROOT = Path(__file__).resolve().parents[2]


class JobConfigError(ValueError):
    """A job file or override that does not validate; the message says what to change."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSection(_Section):
    """Which model: a preset from molm_ds.config plus field overrides."""

    preset: str = Field("tiny", description="Preset name in molm_ds.config.PRESETS.")
    overrides: dict[str, Any] = Field(default_factory=dict, description="ModelConfig fields to change.")

    @field_validator("preset")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in preset_names():
            raise ValueError(f"unknown model preset {v!r}; valid presets: {', '.join(preset_names())}")
        return v

    @model_validator(mode="after")
    def _builds(self) -> "ModelSection":
        unknown = sorted(set(self.overrides) - set(ModelConfig.model_fields))
        if unknown:
            raise ValueError(f"model.overrides has unknown keys {unknown}; valid keys: "
                             f"{', '.join(ModelConfig.model_fields)}")
        self.build()  # raises with ModelConfig's own message
        return self

    def build(self) -> ModelConfig:
        return ModelConfig.from_preset(self.preset, **self.overrides)


class SourceSection(_Section):
    path: str = Field(description="Shard directory or Megatron prefix (see molm_ds.data.manifest).")
    weight: float = Field(1.0, gt=0, description="Sampling weight (normalised over the sources).")


class DataSection(_Section):
    sources: list[SourceSection] = Field(min_length=1, description="The training mixture.")
    seq_len: int = Field(ge=1, description="Tokens per training sequence.")
    val_fraction: float = Field(0.01, ge=0, lt=1, description="Windows held out per source for validation.")
    eval_batches: int = Field(4, ge=1, description="Validation micro-batches per rank at each evaluation.")


class LossWeights(_Section):
    """Weights of the aux terms in loss = CE + sum(weight * term). Every term is logged whatever its weight."""

    mi: float = Field(0.01, ge=0, description="Mutual-information load balance H(m|x) - H(m) (pretraining).")
    load_concentration: float = Field(0.0, ge=0, description="H(m) (fine-tuning).")
    switch: float = Field(0.0, ge=0, description="Switch-Transformer balance loss (baseline).")
    z: float = Field(0.0, ge=0, description="Router z-loss (baseline).")


class TrainingSection(_Section):
    steps: int = Field(ge=1, description="Optimizer steps in the run (total, resumed runs included).")
    micro_batch_size: int = Field(ge=1, description="Sequences per rank per forward.")
    grad_accum_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    lr: float = Field(3e-4, gt=0, description="Peak learning rate.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine floor as a fraction of lr.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup from 0 to lr.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW decoupled weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    grad_clip: float = Field(1.0, ge=0, description="Global gradient-norm clip (0 = off); becomes ds gradient_clipping.")
    loss_weights: LossWeights = Field(default_factory=LossWeights)
    eval_interval: int = Field(0, ge=0, description="Validation perplexity every N steps and at the end (0 = never).")
    seed: int = Field(1234, description="Seeds weights (same on every rank), data order and RNG streams.")
    max_nonfinite_in_a_row: int = Field(5, ge=1, description="Stop after this many skipped non-finite steps in a row.")

    @model_validator(mode="after")
    def _check(self) -> "TrainingSection":
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} is more than steps={self.steps}: lower warmup_steps")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas {self.betas} must each be in [0, 1)")
        return self


class ParallelSection(_Section):
    ep_size: int = Field(1, ge=1, description="Expert-parallel group size; divides the world size and every expert count.")
    replicate_attention_experts: bool = Field(
        False, description="Keep attention experts whole on every rank (data parallel) instead of expert-parallel.")


class DeepSpeedSection(_Section):
    config: str = Field("ds_configs/zero1_fp32.json", description="A ds_configs JSON (relative: to cwd, else the repo).")

    def resolved_path(self) -> Path:
        p = Path(self.config)
        for cand in ([p] if p.is_absolute() else [Path.cwd() / p, REPO_ROOT / p]):
            if cand.is_file():
                return cand
        shipped = sorted(x.name for x in (REPO_ROOT / "ds_configs").glob("*.json"))
        raise ValueError(f"deepspeed.config {self.config!r} not found (looked in {Path.cwd()} and {REPO_ROOT}); "
                         f"shipped configs: {', '.join('ds_configs/' + s for s in shipped)}")

    @model_validator(mode="after")
    def _check(self) -> "DeepSpeedSection":
        from molm_ds.train.ds_config import read_ds_config

        read_ds_config(self.resolved_path())  # parses, refuses ZeRO-3 and job-owned keys
        return self


class CheckpointSection(_Section):
    dir: Optional[str] = Field(None, description="Checkpoint directory (default: <run_dir>/checkpoints).")
    interval: int = Field(0, ge=0, description="Save every N steps (0 = only at the end).")
    keep: int = Field(0, ge=0, description="Keep the newest N complete checkpoints (0 = keep all).")
    save_final: bool = Field(True, description="Save after the last step.")


class MonitorSection(_Section):
    tensorboard: bool = Field(True, description="TensorBoard scalars through DeepSpeed's monitor.")
    tensorboard_dir: Optional[str] = Field(None, description="Default: <run_dir>/tensorboard.")
    log_interval: int = Field(1, ge=1, description="Progress line, metrics.jsonl row and scalars every N steps.")
    expert_load: MonitorConfig = Field(
        default_factory=MonitorConfig,
        description="Expert-load monitoring, histograms/heatmaps, MFU peak FLOPs (molm_ds.monitor; docs/monitoring.md).")


class FinetuneSection(_Section):
    """Fine-tuning before pruning (ModuleFormer): concentrate each sub-layer's load on few experts."""

    load_concentration_weight: float = Field(
        0.001, ge=0, description="Weight of H(m) (load concentration), summed over MoE sub-layers; added to "
        "training.loss_weights.load_concentration, every other term unchanged. The paper used 0.001.")


RESERVED_SECTIONS = {"prune": "issue 7 (pruning: run launch/prune.py on the finished checkpoint)"}


class JobConfig(_Section):
    """A training job. ``run_dir`` holds metrics.jsonl, TensorBoard logs and checkpoints by default."""

    name: str = Field("molm", description="Run name (TensorBoard job name).")
    run_dir: str = Field("runs/molm", description="Where the run writes (metrics.jsonl, checkpoints, tensorboard).")
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection
    training: TrainingSection
    parallel: ParallelSection = Field(default_factory=ParallelSection)
    deepspeed: DeepSpeedSection = Field(default_factory=DeepSpeedSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    monitor: MonitorSection = Field(default_factory=MonitorSection)
    resume: Optional[str] = Field(
        None, description="'auto' = newest complete checkpoint in checkpoint.dir if any (else a fresh start, logged); "
        "a path = that checkpoint directory or tag (must be complete); null = fresh start.")
    init_from: Optional[str] = Field(
        None, description="Start from the weights of this checkpoint (directory = newest complete tag, or a tag); "
        "the model section must describe the model it holds. See molm_ds.continual.")
    continual: Optional[ContinualSection] = Field(
        None, description="Insert new experts into the init_from model and train them (docs/continual.md).")
    finetune: Optional[FinetuneSection] = Field(
        None, description="Load-concentration fine-tuning (docs/finetune_prune.md); usually with init_from.")
    prune: Optional[Any] = None

    @model_validator(mode="after")
    def _cross(self) -> "JobConfig":
        for key, owner in RESERVED_SECTIONS.items():
            if getattr(self, key) is not None:
                raise ValueError(f"section {key!r} is reserved for {owner} and not supported by this version; remove it")
        if self.continual is not None and self.init_from is None:
            raise ValueError("continual needs init_from: the checkpoint whose model gets the new experts")
        if self.continual is not None:
            self.continual.check_ep_size(self.model.build(), ep_size=self.parallel.ep_size,
                                         replicate_attention_experts=self.parallel.replicate_attention_experts)
        cfg = self.build_model_config()
        ep = self.parallel.ep_size
        counts = {"n_mlp_experts": cfg.n_mlp_experts}
        if not self.parallel.replicate_attention_experts:
            counts["n_att_experts"] = cfg.n_att_experts
        for field, n in counts.items():
            if n % ep:
                raise ValueError(f"parallel.ep_size={ep} does not divide model {field}={n}: choose an ep_size that "
                                 f"divides {n}" + (" (or set parallel.replicate_attention_experts: true)"
                                                   if field == "n_att_experts" else ""))
        return self

    # ---- derived ---------------------------------------------------------------------------------
    def build_model_config(self) -> ModelConfig:
        """The model this job trains: the model section, grown by the continual section's new experts."""
        if self.continual is not None:
            return grown_config(self.model.build(), attention=self.continual.attention, mlp=self.continual.mlp)
        return self.model.build()

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or os.path.join(self.run_dir, "checkpoints")

    @property
    def tensorboard_dir(self) -> str:
        return self.monitor.tensorboard_dir or os.path.join(self.run_dir, "tensorboard")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_none=True), sort_keys=False)


# ---- loading ----------------------------------------------------------------------------------
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def parse_overrides(items: list[str]) -> list[tuple[list[str], Any]]:
    """``["training.steps=10", "data.seq_len=32"]`` -> [(["training", "steps"], 10), ...] (values parsed as YAML)."""
    out = []
    for item in items:
        if "=" not in item:
            raise JobConfigError(f"override {item!r} must look like section.key=value, e.g. training.steps=10")
        key, value = item.split("=", 1)
        path = [k for k in key.strip().split(".") if k]
        if not path:
            raise JobConfigError(f"override {item!r} has an empty key")
        parsed = yaml.safe_load(value)
        if isinstance(parsed, str) and _NUMBER.match(parsed):  # YAML 1.1 reads 1e-3 as a string
            parsed = float(parsed)
        out.append((path, parsed))
    return out


def apply_overrides(raw: dict, items: list[str]) -> dict:
    raw = copy.deepcopy(raw)
    for path, value in parse_overrides(items):
        node = raw
        for k in path[:-1]:
            nxt = node.get(k)
            if nxt is None:
                nxt = node[k] = {}
            if not isinstance(nxt, dict):
                raise JobConfigError(f"override {'.'.join(path)}: {k!r} is not a section")
            node = nxt
        node[path[-1]] = value
    return raw


def _section_class(loc: tuple) -> type[BaseModel] | None:
    cls: Any = JobConfig
    for part in loc:
        field = getattr(cls, "model_fields", {}).get(part) if isinstance(part, str) else None
        if field is None:
            if isinstance(part, int):
                continue
            return cls if part == loc[-1] else None
        ann = field.annotation
        args = getattr(ann, "__args__", ()) or ()
        cand = [a for a in (ann, *args) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not cand:
            return None
        cls = cand[0]
    return cls


def format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"invalid job config {source}:"]
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            owner = _section_class(tuple(err["loc"]))
            valid = ", ".join(owner.model_fields) if owner is not None else "?"
            lines.append(f"  {loc}: unknown key; valid keys here: {valid}")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def job_from_dict(raw: dict, source: str = "<dict>") -> JobConfig:
    if not isinstance(raw, dict):
        raise JobConfigError(f"{source}: a job file must be a YAML mapping of sections, got {type(raw).__name__}")
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as exc:
        raise JobConfigError(format_validation_error(exc, source)) from None


def load_job(path: str | os.PathLike, overrides: Optional[list[str]] = None) -> JobConfig:
    """Read, override (``section.key=value``) and validate a job YAML."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        shipped = sorted(p.name for p in (REPO_ROOT / "configs").glob("*.yaml"))
        raise JobConfigError(f"job file {path} not found; shipped jobs: {', '.join('configs/' + s for s in shipped)}")
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    return job_from_dict(apply_overrides(raw, overrides or []), path)
