"""The job file: one YAML describes a training run. Validated strictly, saved in every checkpoint.

Sections (each a small pydantic model, unknown keys rejected with the list of valid ones):
``model`` (preset + overrides), ``data`` (sources, seq_len), ``training`` (steps, batch, schedule,
loss weights), ``parallel`` (ep_size), ``deepspeed`` (a ds_configs JSON), ``checkpoint``,
``monitor``, ``resume``, ``init_from`` (start from a checkpoint's weights), ``continual`` (insert new
experts: molm_ds.continual), ``finetune`` (load concentration before pruning). This module owns the
schema of every section; the code that acts on a section lives with its job kind (the recipes in
``molm_ds.train.recipe`` and ``molm_ds.continual.recipe``). Pruning is ``launch/prune.py`` on a
finished checkpoint, not a section. YAML with a duplicate key is refused.

    job = load_job("configs/demo.yaml", overrides=["training.steps=10"])
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from molm_ds import rundir
from molm_ds.config import ModelConfig, check_expert_split, preset_names
from molm_ds.errors import ConfigError
from molm_ds.monitor.config import MonitorConfig
from molm_ds.paths import read_utf8

__all__ = ["JobConfig", "JobConfigError", "load_job", "job_from_dict", "parse_overrides", "apply_overrides", "parse_yaml",
           "ContinualSection", "FinetuneSection", "REPO_ROOT"]

# configs/ and ds_configs/: beside molm_ds/ in the checkout, molm_ds/shipped/ in an installed package
REPO_ROOT = next((d for d in (Path(__file__).resolve().parents[2], Path(__file__).resolve().parents[1] / "shipped")
                  if (d / "ds_configs").is_dir()), Path(__file__).resolve().parents[2])


class JobConfigError(ConfigError):
    """A job file or override that does not validate; the message says what to change."""


class _Section(BaseModel):
    # strict: no coercion ("2", 2.0 and true are not integers; 1 is not a boolean); floats must be finite
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


def _list_to_tuple(v):
    return tuple(v) if isinstance(v, list) else v  # YAML and JSON have no tuples; strict mode wants one


# Seeds go to random, numpy (32 bits) and torch: one range every library accepts.
SEED_RANGE = (0, 2**32 - 1 - 4096)  # room for seed + 1 + rank
Seed = Annotated[int, Field(ge=SEED_RANGE[0], le=SEED_RANGE[1])]
FloatPair = Annotated[tuple[float, float], BeforeValidator(_list_to_tuple)]

# Signals a scheduler or a user sends to end a job; the others (SIGCHLD, SIGWINCH, SIGSEGV ...) mean something else.
TERMINATION_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGXCPU")

# A name that is one path component: it may become a directory name (TensorBoard's job_name), never a path.
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")


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
    test_fraction: float = Field(0.0, ge=0, lt=1, description="Windows held out per source for a test split "
                                 "(never trained on nor evaluated in the loop; launch/evaluate.py --split test).")
    split_by: Literal["position", "document", "auto"] = Field(
        "position", description="Hold out blocks of windows (position), whole documents (document), or "
                                "documents where they allow it (auto); see molm_ds.data.mixture.")
    eval_batches: int = Field(4, ge=1, description="Validation micro-batches per rank at each evaluation.")

    @model_validator(mode="after")
    def _distinct(self) -> "DataSection":
        seen: dict[str, int] = {}
        for i, s in enumerate(self.sources):
            key = os.path.realpath(s.path)
            if key in seen:
                raise ValueError(f"sources[{i}] ({s.path}) is the same data as sources[{seen[key]}] "
                                 f"({self.sources[seen[key]].path}): list each source once and set its weight instead")
            seen[key] = i
        return self


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
    global_batch_size: Optional[int] = Field(
        None, ge=1, description="Sequences per optimizer step over all ranks; when set, grad_accum_steps is derived "
        "from it at start-up (global / (micro_batch_size x world size)), so a job that restarts on fewer machines "
        "keeps its global batch, data order and schedule.")
    lr: float = Field(3e-4, gt=0, description="Peak learning rate.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine floor as a fraction of lr.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup from 0 to lr.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW decoupled weight decay.")
    betas: FloatPair = Field((0.9, 0.95), description="AdamW betas.")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    grad_clip: float = Field(1.0, ge=0, description="Global gradient-norm clip (0 = off); becomes ds gradient_clipping.")
    loss_weights: LossWeights = Field(default_factory=LossWeights)
    eval_interval: int = Field(0, ge=0, description="Validation perplexity every N steps and at the end (0 = never).")
    seed: Seed = Field(1234, description=f"Seeds weights (same on every rank), data order and RNG streams; "
                       f"in [{SEED_RANGE[0]}, {SEED_RANGE[1]}].")
    max_nonfinite_in_a_row: int = Field(5, ge=1, description="Stop after this many skipped non-finite steps in a row.")
    activation_checkpointing: bool = Field(
        False, description="Recompute each transformer block's activations during the backward instead of keeping "
        "them (torch.utils.checkpoint, non-reentrant): activation memory per block drops to its input, for one more "
        "forward of every block. Losses and gradients are unchanged (dropout and sampled routing replay their RNG).")
    deterministic: bool = Field(
        False, description="Bit-identical reruns: torch.use_deterministic_algorithms(True), deterministic cuDNN/cuBLAS, "
        "and the MoE combine/gather as sorted, atomic-free reductions (molm_ds.train.determinism; costs in "
        "docs/training.md).")

    compile: bool = Field(
        False, description="Compile the model for training with torch.compile (through DeepSpeed's engine.compile; "
        "fullgraph at ep_size 1). Same losses as eager up to float rounding; the first steps pay the compilation.")
    compile_backend: Literal["inductor", "aot_eager", "eager"] = Field(
        "inductor", description="torch.compile backend when compile is on (aot_eager: no code generation, for "
        "checking that the model traces).")

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
    collective_timeout_s: Optional[float] = Field(
        None, gt=0, le=86400, description="Seconds any collective waits for a peer before the job ends with the "
        "lost-peer line (null = 600: a large model's step plus checkpoint skew on GPUs; tests use ~20). A rank whose "
        "step makes no progress for 2x this plus 60 s dumps its Python stacks and exits.")


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
    elastic: bool = Field(
        True, description="Also write the optimizer state by parameter and global expert (optim_universal/), so the "
        "run can resume at another world size, ep_size or ZeRO stage; false saves that space but resumes only at "
        "the topology of the save.")
    preempt_signals: list[str] = Field(
        default_factory=lambda: ["SIGTERM", "SIGUSR1", "SIGINT"],
        description="Signals after which every rank stops at the next step boundary, writes a complete checkpoint "
        "and exits with code 75 (resume with --resume auto); [] = default signal behaviour.")

    @field_validator("preempt_signals")
    @classmethod
    def _signals(cls, v: list[str]) -> list[str]:
        import signal

        bad = [x for x in v if x not in TERMINATION_SIGNALS or not isinstance(getattr(signal, x, None), signal.Signals)]
        if bad:
            raise ValueError(f"{bad} not accepted: preemption listens only to signals that ask a job to end "
                             f"({', '.join(TERMINATION_SIGNALS)})")
        if len(set(v)) != len(v):
            raise ValueError(f"{v} lists a signal twice: list each once")
        return v


class MonitorSection(_Section):
    tensorboard: bool = Field(True, description="TensorBoard scalars through DeepSpeed's monitor.")
    tensorboard_dir: Optional[str] = Field(None, description="Default: <run_dir>/tensorboard.")
    log_interval: int = Field(1, ge=1, description="Progress line, metrics.jsonl row and scalars every N steps.")
    expert_load: MonitorConfig = Field(
        default_factory=MonitorConfig,
        description="Expert-load monitoring, histograms/heatmaps, MFU peak FLOPs (molm_ds.monitor; docs/monitoring.md).")


class ContinualLR(_Section):
    """Peak learning rates per parameter group (null = training.lr); all follow training's schedule."""

    new_experts: Optional[float] = Field(None, gt=0, description="The inserted experts.")
    router: Optional[float] = Field(None, gt=0, description="Router parameters that train (all of them, or A' only).")
    others: Optional[float] = Field(None, gt=0, description="Embeddings, norms, lm_head, shared K/V (if train_others).")


class ContinualEval(_Section):
    """Validation sources for the before/after perplexities (shard directories or Megatron prefixes)."""

    old: list[str] = Field(default_factory=list, description="Old-domain sources (forgetting).")
    new: list[str] = Field(default_factory=list, description="New-domain sources (learning).")


class ContinualSection(_Section):
    """Insert new experts into the ``init_from`` model and train only some parameter groups."""

    attention: int = Field(0, description="New attention experts per layer (>= 0).")
    mlp: int = Field(0, description="New MLP experts per layer (>= 0).")
    strategy: Literal["full_router", "new_only"] = Field(
        "new_only", description="full_router: new experts + every router parameter train, old experts frozen. "
        "new_only: only the new experts and the new router rows A' train, everything else frozen.")
    train_others: bool = Field(
        False, description="full_router only: also train embeddings, norms, lm_head and shared K/V (lr.others).")
    router_reg_weight: float = Field(0.0, ge=0, description="Weight of ||A'||_F^2 (new router rows), summed over sub-layers.")
    lr: ContinualLR = Field(default_factory=ContinualLR)
    distill_weight: float = Field(0.0, ge=0, description="Weight of KL(starting model || trained model) on the logits (0 = off).")
    distill_temperature: float = Field(1.0, gt=0, description="Softmax temperature of the distillation KL.")
    init_seed: Optional[Seed] = Field(None, description="Seed of the new experts' init (null = training.seed).")
    eval: ContinualEval = Field(default_factory=ContinualEval)

    @model_validator(mode="after")
    def _check(self) -> "ContinualSection":
        for kind in ("attention", "mlp"):
            n = getattr(self, kind)
            if n < 0:
                raise ValueError(f"continual.{kind}={n}: the number of new experts per layer must be >= 0")
        if self.attention + self.mlp == 0:
            raise ValueError("continual: add at least one expert (continual.attention or continual.mlp > 0); "
                             "for a warm start without new experts use init_from alone")
        if self.train_others and self.strategy == "new_only":
            raise ValueError("continual.train_others=true contradicts strategy new_only (everything but the new "
                             "experts and A' is frozen): use strategy full_router or drop train_others")
        return self

    def check_ep_size(self, start: ModelConfig, *, ep_size: int, replicate_attention_experts: bool) -> None:
        """ConfigError unless ep_size divides every expert-parallel expert count after insertion."""
        grown = start.grown(attention=self.attention, mlp=self.mlp)
        for name, n in grown.expert_parallel_counts(replicate_attention_experts=replicate_attention_experts).items():
            kind, added = ("attention", self.attention) if "att" in name else ("mlp", self.mlp)
            ok = [k for k in range(0, 4 * ep_size + 1) if (n - added + k) % ep_size == 0][:3]
            check_expert_split(n, ep_size, what=f"continual.{kind}={added}: {n - added} + {added} = {n} {kind} experts "
                               "per layer", hint=f", or insert a number of experts among {ok}"
                               + (" (or set parallel.replicate_attention_experts: true)" if kind == "attention" else ""))


class FinetuneSection(_Section):
    """Fine-tuning before pruning (ModuleFormer): concentrate each sub-layer's load on few experts."""

    load_concentration_weight: float = Field(
        0.001, ge=0, description="Weight of H(m) (load concentration), summed over MoE sub-layers; added to "
        "training.loss_weights.load_concentration, every other term unchanged. The paper used 0.001.")


NOT_SECTIONS = {"prune": "pruning runs on a finished checkpoint: python launch/prune.py --checkpoint CKPT ... (docs/finetune_prune.md)"}


class JobConfig(_Section):
    """A training job. ``run_dir`` holds metrics.jsonl, TensorBoard logs and checkpoints by default."""

    name: str = Field("molm", description="Run name (TensorBoard job name, a directory under tensorboard_dir): letters, "
                      "digits, '.', '_', '+', '-', starting with a letter or digit; never a path.")
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
    overwrite: bool = Field(
        False, description="Start fresh in a run_dir that holds an earlier run's metrics or checkpoints, deleting "
        "them (without it such a start is refused: resume with --resume auto or choose another run_dir).")
    allow_data_change: bool = Field(
        False, description="Resume although the global batch (micro_batch_size x grad_accum_steps x world size), the "
        "data mixture (sources, weights, val_fraction), seq_len or the seed differ from the checkpoint's job: the "
        "weights, optimizer and step continue, the data order starts afresh (without it such a resume is refused: "
        "the exact data order needs the same settings).")
    init_from: Optional[str] = Field(
        None, description="Start from the weights of this checkpoint (directory = newest complete tag, or a tag); "
        "the model section must describe the model it holds. See molm_ds.continual.")
    continual: Optional[ContinualSection] = Field(
        None, description="Insert new experts into the init_from model and train them (docs/continual.md).")
    finetune: Optional[FinetuneSection] = Field(
        None, description="Load-concentration fine-tuning (docs/finetune_prune.md); usually with init_from.")
    prune: Optional[Any] = None

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        if not _PLAIN_NAME.match(v) or v in (".", ".."):
            raise ValueError(f"name {v!r} must be a plain name (letters, digits, '.', '_', '+', '-'; at most 128 "
                             "characters; no '/' or '..'): it becomes a directory under tensorboard_dir")
        return v

    @model_validator(mode="after")
    def _cross(self) -> "JobConfig":
        for key, instead in NOT_SECTIONS.items():
            if getattr(self, key) is not None:
                raise ValueError(f"section {key!r} is not part of a training job: remove it; {instead}")
        if self.continual is not None and self.init_from is None:
            raise ValueError("continual needs init_from: the checkpoint whose model gets the new experts")
        if self.continual is not None:
            self.continual.check_ep_size(self.model.build(), ep_size=self.parallel.ep_size,
                                         replicate_attention_experts=self.parallel.replicate_attention_experts)
        rep = self.parallel.replicate_attention_experts
        for field, n in self.build_model_config().expert_parallel_counts(replicate_attention_experts=rep).items():
            check_expert_split(n, self.parallel.ep_size, what=f"parallel.ep_size={self.parallel.ep_size} does not "
                               f"divide model {field}={n}", hint=(
                " (or set parallel.replicate_attention_experts: true)" if field.startswith("n_att") else ""))
        return self

    # ---- derived ---------------------------------------------------------------------------------
    def at_world_size(self, world: int) -> "JobConfig":
        """This job at ``world`` ranks: ``grad_accum_steps`` derived from ``training.global_batch_size``."""
        t = self.training
        if t.global_batch_size is None:
            return self
        per_step = t.micro_batch_size * world
        if t.global_batch_size % per_step:
            raise JobConfigError(f"training.global_batch_size={t.global_batch_size} is not a multiple of micro_batch_size "
                                 f"{t.micro_batch_size} x world size {world} = {per_step}: choose a global batch that "
                                 f"every world size you run at divides")
        accum = t.global_batch_size // per_step
        return self.model_copy(update={"training": t.model_copy(update={"grad_accum_steps": accum})})

    def build_model_config(self) -> ModelConfig:
        """The model this job trains: the model section, grown by the continual section's new experts."""
        if self.continual is not None:
            return self.model.build().grown(attention=self.continual.attention, mlp=self.continual.mlp)
        return self.model.build()

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or rundir.checkpoint_dir(self.run_dir)

    @property
    def tensorboard_dir(self) -> str:
        return self.monitor.tensorboard_dir or rundir.tensorboard_dir(self.run_dir)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_none=True), sort_keys=False)


# ---- loading ----------------------------------------------------------------------------------
class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping with the same key twice (PyYAML keeps the last silently) and reads
    ``1e-3`` as a float, as YAML 1.2 does (PyYAML's YAML 1.1 reads it as a string)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {seen[key] + 1}); keep one of them",
                    key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def parse_yaml(text: str, source: str):
    """YAML text -> Python objects; syntax errors and duplicate keys become one JobConfigError line."""
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source} line {mark.line + 1}, column {mark.column + 1}" if mark is not None else source
        problem = getattr(exc, "problem", None) or str(exc)
        raise JobConfigError(f"{where}: invalid YAML: {problem}") from None


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
        parsed = parse_yaml(value, f"override {item!r}")
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


def job_keys(cls: type[BaseModel] | None = None, prefix: str = "") -> list[str]:
    """Every settable dotted field of a job (``training.steps``, ``monitor.expert_load.interval``, ...)."""
    out = []
    for name, field in (cls or JobConfig).model_fields.items():
        ann = field.annotation
        nested = [a for a in (ann, *(getattr(ann, "__args__", ()) or ())) if isinstance(a, type) and issubclass(a, BaseModel)]
        if nested and not (getattr(ann, "__origin__", None) in (list, dict)):
            out += job_keys(nested[0], f"{prefix}{name}.")
        else:
            out.append(prefix + name)
    return out


def format_validation_error(exc: ValidationError, source: str, overrides: Optional[list[str]] = None) -> str:
    """One line: every problem, each with where it is and what to change (nearest key for a typo). A field
    that an override set is named by its ``--set`` item, not by the job file."""
    import difflib

    set_by = {".".join(path): item for item, (path, _) in zip(overrides or [], parse_overrides(overrides or []))}
    items, from_file = [], False
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            owner = _section_class(tuple(err["loc"]))
            valid = list(owner.model_fields) if owner is not None else []
            near = difflib.get_close_matches(str(err["loc"][-1]), valid, n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            msg = f"unknown key; {hint}valid keys here: {', '.join(valid) or '?'}"
        else:
            msg = err["msg"].removeprefix("Value error, ")
        key = next((k for k in set_by if loc == k or loc.startswith(k + ".")), None)
        from_file = from_file or key is None
        items.append(f"{loc}: {msg}" if key is None else f"--set {set_by[key]}: " + (f"{loc}: " if loc != key else "") + msg)
    return (f"invalid job config {source}: " if from_file else "invalid override: ") + "; ".join(items)


def job_from_dict(raw: dict, source: str = "<dict>", overrides: Optional[list[str]] = None) -> JobConfig:
    """Validate ``raw``; ``overrides`` (already applied to it) are named in errors about the fields they set."""
    if not isinstance(raw, dict):
        raise JobConfigError(f"{source}: a job file must be a YAML mapping of sections, got {type(raw).__name__}")
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as exc:
        raise JobConfigError(format_validation_error(exc, source, overrides)) from None


def load_job(path: str | os.PathLike, overrides: Optional[list[str]] = None) -> JobConfig:
    """Read, override (``section.key=value``) and validate a job YAML."""
    path = os.fspath(path)
    if not os.path.isfile(path) and not os.path.isabs(path) and (REPO_ROOT / path).is_file():
        path = os.fspath(REPO_ROOT / path)  # a shipped job (configs/...) named from another directory
    if not os.path.isfile(path):
        shipped = sorted(p.name for p in (REPO_ROOT / "configs").glob("*.yaml"))
        raise JobConfigError(f"job file {path} not found; shipped jobs: {', '.join('configs/' + s for s in shipped)}")
    raw = parse_yaml(read_utf8(path, what="job file", error=JobConfigError), path) or {}
    return job_from_dict(apply_overrides(raw, overrides or []), path, overrides)
