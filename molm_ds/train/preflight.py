"""Every check that a user's mistake can fail, in one place, before any model is built.

Called on every rank right after the process group starts (the checks that need the world size
need it): the ds_config (keys, batch sizes, ZeRO stage), expert parallelism against the world size
and the expert counts, the resume target and whether it fits this job, the recipe's own checks
(``init_from``), the data (shard directories open, tokenizer fits the vocabulary) and the run
directory. Each failure is a ``UserError`` whose message says what to change; the entry point prints
it as one ``error:`` line.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

from molm_ds.errors import CheckpointError, ConfigError
from molm_ds.paths import ensure_writable_dir
from molm_ds.train import checkpoint as ckpt
from molm_ds.train.data import TrainData, check_vocab
from molm_ds.train.ds_config import build_ds_config
from molm_ds.train.job import JobConfig

__all__ = ["Preflight", "preflight"]


@dataclass
class Preflight:
    ds_config: dict  # the filled ds_config handed to deepspeed.initialize
    resume_from: Optional[tuple[str, str]]  # (checkpoint dir, tag) or None for a fresh start
    data: TrainData


def _check_expert_parallel(job: JobConfig, world: int) -> None:
    from molm_ds.parallel.groups import check_expert_parallel

    cfg = job.build_model_config()
    counts = {"mlp experts": cfg.n_mlp_experts}
    if not job.parallel.replicate_attention_experts:
        counts["attention experts"] = cfg.n_att_experts
    check_expert_parallel(ep_size=job.parallel.ep_size, world_size=world, expert_counts=counts)


def _check_resume_target(job: JobConfig, target: tuple[str, str]) -> None:
    d, tag = target
    where = os.path.join(d, tag)
    with open(os.path.join(where, ckpt.COMPLETE)) as f:
        try:
            marker = json.load(f)
        except json.JSONDecodeError:
            marker = {}
    kind = marker.get("kind", "pruned" if marker.get("pruned") else "grown" if marker.get("grown") else "train")
    if kind != "train":
        raise CheckpointError(f"resume: {where} holds weights only ({kind}), no optimizer or data state: start from "
                              f"it with init_from: {where} (and no resume)")
    have = ckpt.model_config(d, tag)
    if have != job.build_model_config():
        ckpt.check_same_model(have, job.build_model_config(), where=where, what="resume")


def _check_run_dir(job: JobConfig) -> None:
    ensure_writable_dir(job.run_dir, what="run_dir", error=ConfigError)
    ensure_writable_dir(job.checkpoint_dir, what="checkpoint.dir", error=ConfigError)


def preflight(job: JobConfig, recipe, rank: int, world: int) -> Preflight:
    ds_cfg = build_ds_config(job, world)
    _check_expert_parallel(job, world)
    resume_from = ckpt.resolve_resume(job.resume, job.checkpoint_dir)
    if resume_from is not None:
        _check_resume_target(job, resume_from)
    recipe.check()
    check_vocab(job)
    data = TrainData(job, rank, world)
    _check_run_dir(job)
    return Preflight(ds_cfg, resume_from, data)
