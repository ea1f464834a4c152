"""What a checkpoint says about itself: the job that wrote it and the model it holds."""

from __future__ import annotations

import os

import yaml

from molm_ds.checkpoint.layout import JOB_FILE
from molm_ds.errors import CheckpointError

__all__ = ["read_job", "model_config"]


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
