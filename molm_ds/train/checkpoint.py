"""The checkpoint layout: the one module that writes, resolves and reads molm-ds checkpoints.

    <checkpoint dir>/
      latest                          DeepSpeed's pointer to the newest tag
      step_00000100/                  one tag per save
        mp_rank_00_model_states.pt    {"module": non-expert weights, ...} (+ client_state when trained)
        layer_{L}_expert_{E}_mp_rank_00_model_states.pt   one file per (MoE sub-layer L, GLOBAL expert E)
        *optim_states.pt              optimizer shards (training checkpoints only)
        rng_rank{r}.pt                python / numpy / torch RNG state of rank r (training checkpoints)
        job.yaml                      the job that wrote it; its model section describes the model
        COMPLETE                      written last, once every rank finished (JSON: step, kind, files)

Two writers share it: ``save`` (the trainer, through DeepSpeed's engine, with optimizer state) and
``write_model`` (a plain model, weights only: pruning, expert insertion, imports). Everything else reads
it through ``resolve`` / ``resolve_resume`` (which tag), ``model_config`` / ``read_model_state`` /
``load_model`` (a plain single-process model at whatever ep_size the files were written) and ``load``
(the trainer's resume). Expert files are keyed by global expert id: that is what lets the weights load
at any ep_size. L counts expert-parallel MoE sub-layers in ``named_modules()`` order (block 0
attention, block 0 MLP, ...), each file holding ``<sub-layer>.experts.deepspeed_moe.experts.
deepspeed_experts.{E}.{w1|w2|w_q|w_o}`` (one expert's slice, DeepSpeed's MoE naming).

A tag without COMPLETE is partial (a run killed while saving) and is never read.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from typing import Optional

import numpy as np
import torch
import yaml

from molm_ds.errors import CheckpointError
from molm_ds.log import get_logger

log = get_logger("train.checkpoint")

__all__ = [
    "COMPLETE", "MODEL_FILE", "JOB_FILE", "CheckpointError", "tag_for", "step_of", "list_tags", "is_complete",
    "newest_complete", "resolve", "resolve_resume", "expert_file", "list_expert_files", "check_expert_files",
    "save", "load", "load_weights", "read_job", "model_config", "read_model_state", "load_model", "write_model",
    "has_fp32_masters", "read_fp32_state", "load_fp32_model",
    "model_section", "rng_state", "set_rng_state",
]

COMPLETE = "COMPLETE"
MODEL_FILE = "mp_rank_00_model_states.pt"
JOB_FILE = "job.yaml"
EXPERT_INFIX = "deepspeed_moe.experts.deepspeed_experts"  # DeepSpeed's per-expert key infix
_TAG = re.compile(r"^step_(\d+)$")
_EXPERT_FILE = re.compile(r"^layer_(\d+)_expert_(\d+)_mp_rank_(\d+)_model_states\.pt$")
_EXPERT_KEY = re.compile(r"^(?P<prefix>.+\.experts)\." + re.escape(EXPERT_INFIX) + r"\.(?P<e>\d+)\.(?P<name>\w+)$")


# ---- names ---------------------------------------------------------------------------------------
def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_of(tag: str) -> int:
    m = _TAG.match(os.path.basename(os.path.normpath(tag)))
    if not m:
        raise CheckpointError(f"{tag!r} is not a checkpoint tag (expected step_NNNNNNNN)")
    return int(m.group(1))


def list_tags(ckpt_dir: str) -> list[str]:
    """Tag directory names in ckpt_dir, oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    tags = [t for t in os.listdir(ckpt_dir) if _TAG.match(t) and os.path.isdir(os.path.join(ckpt_dir, t))]
    return sorted(tags, key=step_of)


def is_complete(ckpt_dir: str, tag: str) -> bool:
    return os.path.isfile(os.path.join(ckpt_dir, tag, COMPLETE))


def newest_complete(ckpt_dir: str) -> Optional[str]:
    done = [t for t in list_tags(ckpt_dir) if is_complete(ckpt_dir, t)]
    return done[-1] if done else None


def expert_file(ckpt_dir: str, tag: str, layer_id: int, expert_id: int, mp_rank: int = 0) -> str:
    """Path of one expert's file (DeepSpeed's ``_get_expert_ckpt_name``)."""
    return os.path.join(ckpt_dir, str(tag), f"layer_{layer_id}_expert_{expert_id}_mp_rank_{mp_rank:02d}_model_states.pt")


def list_expert_files(ckpt_dir: str, tag: str) -> dict[tuple[int, int], str]:
    """{(layer L, global expert E): path} of the expert files in a tag directory."""
    d = os.path.join(ckpt_dir, str(tag))
    out = {}
    for f in os.listdir(d):
        m = _EXPERT_FILE.match(f)
        if m:
            out[(int(m.group(1)), int(m.group(2)))] = os.path.join(d, f)
    return out


def check_expert_files(ckpt_dir: str, tag: str, info) -> None:
    """CheckpointError naming what is missing unless the tag has exactly one file per (expert-parallel
    sub-layer, global expert) of ``info`` (an ``ExpertParallelInfo``)."""
    have = list_expert_files(ckpt_dir, tag)
    want = {(l.ckpt_layer_id, e) for l in info.layers for e in range(l.num_experts)}
    missing, extra = sorted(want - set(have)), sorted(set(have) - want)
    if missing or extra:
        raise CheckpointError(
            f"checkpoint {os.path.join(ckpt_dir, str(tag))}: expert files do not match the model "
            f"({len(info.layers)} expert-parallel sub-layers): missing (layer, expert) {missing[:8]}"
            f"{'...' if len(missing) > 8 else ''}, unexpected {extra[:8]}; was it written with the same model and "
            "replicate_attention_experts setting, and did every rank finish writing?")


# ---- which tag -----------------------------------------------------------------------------------
def resolve(path: str, *, what: str = "checkpoint") -> tuple[str, str]:
    """(checkpoint dir, tag) for a checkpoint directory (its newest complete tag) or a tag directory
    (which must be complete). ``what`` names the option in error messages (``init_from``, ``--checkpoint``)."""
    p = os.path.normpath(path)
    if not os.path.exists(p):
        raise CheckpointError(f"{what}: {path} does not exist; give a checkpoint directory or a step_NNNNNNNN tag "
                              "directory of a finished run")
    if os.path.isfile(os.path.join(p, MODEL_FILE)) or _TAG.match(os.path.basename(p)):  # a tag directory
        parent, tag = os.path.dirname(p) or ".", os.path.basename(p)
        if not is_complete(parent, tag):
            older = [t for t in list_tags(parent) if is_complete(parent, t) and t != tag]
            raise CheckpointError(f"{what}: {p} is a partial checkpoint (no {COMPLETE} marker: a rank did not finish "
                                  f"writing); use a complete one{': ' + older[-1] if older else ''}")
        return parent, tag
    tag = newest_complete(p)
    if tag is None:
        raise CheckpointError(f"{what}: no complete checkpoint in {p} (tags found: {list_tags(p) or 'none'})")
    return p, tag


def resolve_resume(resume: Optional[str], ckpt_dir: str) -> Optional[tuple[str, str]]:
    """(checkpoint dir, tag) to resume from, or None for a fresh start.

    ``auto``: the newest complete tag in ckpt_dir; no tags at all = fresh start (logged); tags but none
    complete = error. A path: a checkpoint directory (its newest complete tag) or a tag directory
    (which must be complete); missing or partial = error.
    """
    if resume is None:
        return None
    if resume != "auto":
        return resolve(resume, what="resume")
    tags = list_tags(ckpt_dir)
    if not tags:
        log.info("resume: auto: no checkpoint in %s, starting fresh", ckpt_dir)
        return None
    tag = newest_complete(ckpt_dir)
    if tag is None:
        raise CheckpointError(f"resume: auto: {ckpt_dir} holds only partial checkpoints ({', '.join(tags)}; no "
                              f"{COMPLETE} marker); delete them to start fresh or point resume at a complete one")
    newer = [t for t in tags if step_of(t) > step_of(tag)]
    if newer:
        log.warning("resume: skipping partial checkpoint(s) %s (no %s marker)", ", ".join(newer), COMPLETE)
    return ckpt_dir, tag


# ---- RNG -----------------------------------------------------------------------------------------
def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _rng_file(ckpt_dir: str, tag: str, rank: int) -> str:
    return os.path.join(ckpt_dir, tag, f"rng_rank{rank}.pt")


def _mark_complete(tag_dir: str, info: dict) -> None:
    """The COMPLETE marker, written last: what wrote the tag and every file's size."""
    files = {f: os.path.getsize(os.path.join(tag_dir, f)) for f in sorted(os.listdir(tag_dir)) if f != COMPLETE}
    tmp = os.path.join(tag_dir, COMPLETE + ".tmp")
    with open(tmp, "w") as f:
        json.dump({**info, "time": time.time(), "files": files}, f)
    os.replace(tmp, os.path.join(tag_dir, COMPLETE))


# ---- the trainer's checkpoints (DeepSpeed engine) ------------------------------------------------
def save(engine, ckpt_dir: str, step: int, client_state: dict, *, job_yaml: str, ep_info=None, keep: int = 0) -> str:
    """Save on every rank (collective); rank 0 writes COMPLETE after a barrier. Returns the tag."""
    from molm_ds.parallel import comm

    tag = tag_for(step)
    rank, world = comm.rank(), comm.world_size()
    t0 = time.time()
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client_state)
    torch.save(rng_state(), _rng_file(ckpt_dir, tag, rank))
    comm.barrier()  # every rank's files are on disk
    if rank == 0:
        if ep_info is not None:
            check_expert_files(ckpt_dir, tag, ep_info)
        with open(os.path.join(ckpt_dir, tag, JOB_FILE), "w") as f:
            f.write(job_yaml)
        _mark_complete(os.path.join(ckpt_dir, tag), {"kind": "train", "step": step, "world_size": world})
        if keep > 0:
            for old in [t for t in list_tags(ckpt_dir) if is_complete(ckpt_dir, t)][:-keep]:
                shutil.rmtree(os.path.join(ckpt_dir, old), ignore_errors=True)
    comm.barrier()  # nobody reads a checkpoint before it is marked
    log.info("saved checkpoint %s in %.1fs", os.path.join(ckpt_dir, tag), time.time() - t0)
    return tag


def load(engine, ckpt_dir: str, tag: str) -> dict:
    """Load weights, optimizer state and this rank's RNG into a trainer's engine; returns the client_state."""
    from molm_ds.parallel import comm

    if not is_complete(ckpt_dir, tag):
        raise CheckpointError(f"{os.path.join(ckpt_dir, tag)} is partial (no {COMPLETE} marker)")
    path, client_state = engine.load_checkpoint(ckpt_dir, tag=tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=False)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load {os.path.join(ckpt_dir, tag)}")
    rng = _rng_file(ckpt_dir, tag, comm.rank())
    if os.path.isfile(rng):
        set_rng_state(torch.load(rng, weights_only=False))
    else:
        log.warning("%s missing (saved with a different world size?): RNG streams restart from the seed", rng)
    return client_state or {}


def load_weights(engine, ckpt_dir: str, tag: Optional[str] = None, *, strict: bool = True):
    """Only the model weights into ``engine``, at any ep_size (each rank reads its own global experts).
    Returns (load_path, client_state)."""
    path, client_state = engine.load_checkpoint(ckpt_dir, tag, load_module_strict=strict, load_optimizer_states=False,
                                                load_lr_scheduler_states=False, load_module_only=True)
    if path is None:
        raise CheckpointError(f"no DeepSpeed checkpoint found in {ckpt_dir!r} (tag {tag!r})")
    return path, client_state


# ---- plain models --------------------------------------------------------------------------------
def read_job(ckpt_dir: str, tag: str) -> dict:
    """The job.yaml of a tag, as a dict."""
    job_file = os.path.join(ckpt_dir, tag, JOB_FILE)
    if not os.path.isfile(job_file):
        raise CheckpointError(f"{job_file} missing: not a molm-ds checkpoint (written by launch/pretrain.py, "
                              "launch/prune.py or molm_ds.continual.grow_checkpoint)")
    with open(job_file) as f:
        return yaml.safe_load(f) or {}


def model_config(ckpt_dir: str, tag: str):
    """The model a tag holds: its job's model section, grown by its continual section (if any)."""
    from molm_ds.train.job import ModelSection

    raw = read_job(ckpt_dir, tag)
    try:
        cfg = ModelSection(**raw.get("model", {})).build()
    except ValueError as exc:
        raise CheckpointError(f"{os.path.join(ckpt_dir, tag, JOB_FILE)}: model section does not build ({exc})") from None
    cont = raw.get("continual") or {}
    return cfg.grown(attention=int(cont.get("attention", 0)), mlp=int(cont.get("mlp", 0)))


def read_model_state(ckpt_dir: str, tag: str) -> dict[str, torch.Tensor]:
    """Non-expert weights plus every expert file stacked back by global id: a single-process state dict."""
    d = os.path.join(ckpt_dir, tag)
    main = os.path.join(d, MODEL_FILE)
    if not os.path.isfile(main):
        raise CheckpointError(f"{main} missing: {d} is not a complete checkpoint")
    sd = dict(torch.load(main, map_location="cpu", weights_only=False)["module"])
    per: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for (_, _), f in sorted(list_expert_files(ckpt_dir, tag).items()):
        for k, v in torch.load(f, map_location="cpu", weights_only=False).items():
            m = _EXPERT_KEY.match(k)
            if m is None:
                raise CheckpointError(f"{f}: unexpected key {k!r} (not a molm-ds expert slice)")
            per.setdefault((m["prefix"], m["name"]), {})[int(m["e"])] = v
    for (prefix, name), by_id in per.items():
        ids = sorted(by_id)
        if ids != list(range(len(ids))):
            raise CheckpointError(f"checkpoint {d}: {prefix}.{name} has expert files for ids {ids}; some are missing")
        sd[f"{prefix}.{name}"] = torch.stack([by_id[i] for i in ids])
    return sd


def load_model(path: str, *, expect=None, what: str = "checkpoint"):
    """The plain (full, single-process) MoLM held by a checkpoint directory or tag. ``expect``: the
    ModelConfig the caller believes it holds; a mismatch is a CheckpointError naming the fields."""
    from molm_ds.model import MoLM

    ckpt_dir, tag = resolve(path, what=what)
    cfg = model_config(ckpt_dir, tag)
    if expect is not None:
        check_same_model(cfg, expect, where=os.path.join(ckpt_dir, tag), what=what)
    model = MoLM(cfg)
    missing, unexpected = model.load_state_dict(read_model_state(ckpt_dir, tag), strict=False)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {os.path.join(ckpt_dir, tag)} does not fit its job's model: missing "
                              f"{missing[:6]}, unexpected {unexpected[:6]}")
    return model


def has_fp32_masters(ckpt_dir: str, tag: str) -> bool:
    """Whether the tag is a bf16/fp16 trainer checkpoint whose optimizer shards hold fp32 master weights."""
    from molm_ds.train import ds_masters

    main = os.path.join(ckpt_dir, tag, MODEL_FILE)
    if not os.path.isfile(main):
        return False
    ds_config = torch.load(main, map_location="cpu", weights_only=False, mmap=True).get("ds_config") or {}
    return ds_masters.has_fp32_masters(os.path.join(ckpt_dir, tag), ds_config)


def read_fp32_state(ckpt_dir: str, tag: str) -> dict[str, torch.Tensor]:
    """``read_model_state`` in fp32, with DeepSpeed's fp32 master copy of every trained parameter when the
    run trained in bf16/fp16 (its optimizer shards, any ZeRO stage 0-2 and ep_size:
    ``molm_ds.train.ds_masters``) instead of the rounded weights; an fp32 run's weights are its masters.
    Frozen parameters keep their saved value."""
    from molm_ds.model import MoLM
    from molm_ds.train.ds_masters import read_fp32_masters

    sd = read_model_state(ckpt_dir, tag)
    d = os.path.join(ckpt_dir, tag)
    if has_fp32_masters(ckpt_dir, tag):
        with torch.device("meta"):
            shapes = {n: p.shape for n, p in MoLM(model_config(ckpt_dir, tag)).named_parameters()}
        parallel = read_job(ckpt_dir, tag).get("parallel") or {}
        replicated = bool(parallel.get("replicate_attention_experts", False))
        sharded = {n for n in shapes if ".mlpf.experts." in n or (".attn.experts." in n and not replicated)}
        sd.update(read_fp32_masters(d, low_precision=sd, shapes=shapes, ep_size=int(parallel.get("ep_size", 1)),
                                    expert_parallel=sharded))
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


def load_fp32_model(path: str, *, what: str = "checkpoint"):
    """``load_model`` with the fp32 masters (``read_fp32_state``): the full-precision plain model."""
    from molm_ds.model import MoLM

    ckpt_dir, tag = resolve(path, what=what)
    model = MoLM(model_config(ckpt_dir, tag))
    missing, unexpected = model.load_state_dict(read_fp32_state(ckpt_dir, tag), strict=False)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {os.path.join(ckpt_dir, tag)} does not fit its job's model: missing "
                              f"{missing[:6]}, unexpected {unexpected[:6]}")
    return model


def check_same_model(have, want, *, where: str, what: str = "init_from") -> None:
    """CheckpointError unless two ModelConfigs are equal, naming the differing fields and the fix."""
    if have == want:
        return
    a, b = have.model_dump(), want.model_dump()
    diff = {k: a[k] for k in a if a[k] != b[k]}
    raise CheckpointError(f"{what} {where} holds a different model than the job's model section: the checkpoint has "
                          f"{diff}, the job {({k: b[k] for k in diff})}; the model section must describe the model in "
                          f"the checkpoint: set model.overrides to include {diff} (or pick the right preset / checkpoint)")


def model_section(cfg, preset: str = "tiny") -> dict:
    """A job's ``model`` section that builds exactly ``cfg``: the preset plus every field that differs."""
    from molm_ds.config import ModelConfig

    base = ModelConfig.from_preset(preset).model_dump(mode="json")
    full = cfg.model_dump(mode="json")
    return {"preset": preset, "overrides": {k: v for k, v in full.items() if v != base[k]}}


def write_model(model, job: dict, out_dir: str, *, tag: str, kind: str, extra_files: Optional[dict] = None) -> str:
    """Write a plain model as a weights-only checkpoint ``out_dir/<tag>/`` in the trainer's layout (loads
    with ``load_model``, as a job's ``init_from``, at any ep_size that divides the expert counts).

    ``job``: the job dict to store (its ``model`` section is replaced by one that builds this model;
    ``init_from``, ``continual`` and ``resume`` are dropped: they described how it was made, not what
    it is). ``kind``: recorded in COMPLETE (``pruned``, ``grown``, ``imported``). ``extra_files``:
    {name: YAML-able dict} written beside (e.g. prune.yaml). Returns the tag directory."""
    d = os.path.join(out_dir, tag)
    os.makedirs(d, exist_ok=True)
    expert_keys = set()
    layer_id = 0
    for prefix, module in model.named_modules():
        if not (hasattr(module, "router") and hasattr(module, "experts")):
            continue
        names = [n for n, _ in module.experts.named_parameters(recurse=False)]
        for e in range(int(module.num_experts)):
            out = {f"{prefix}.experts.{EXPERT_INFIX}.{e}.{n}": getattr(module.experts, n)[e].detach().clone().cpu()
                   for n in names}
            torch.save(out, expert_file(out_dir, tag, layer_id, e))
        expert_keys.update(f"{prefix}.experts.{n}" for n in names)
        layer_id += 1
    sd = model.state_dict()
    torch.save({"module": {k: v.detach().cpu() for k, v in sd.items() if k not in expert_keys}}, os.path.join(d, MODEL_FILE))
    job = {k: v for k, v in job.items() if k not in ("init_from", "continual", "resume")}
    job["model"] = model_section(model.config, (job.get("model") or {}).get("preset", "tiny"))
    with open(os.path.join(d, JOB_FILE), "w") as f:
        yaml.safe_dump(job, f, sort_keys=False)
    for name, content in (extra_files or {}).items():
        with open(os.path.join(d, name), "w") as f:
            yaml.safe_dump(content, f, sort_keys=False)
    _mark_complete(d, {"kind": kind, "step": step_of(tag) if _TAG.match(tag) else None})
    with open(os.path.join(out_dir, "latest"), "w") as f:
        f.write(tag)
    return d
