"""What a checkpoint says about itself: the job that wrote it and the model it holds.

Every tag records its model in ``model.json`` (``layout.MODEL_RECORD``)::

    {"config": {ModelConfig fields},
     "sublayers": [{"name": "blocks.0.attn", "layer": 0, "kind": "attn", "num_experts": 4,
                    "stacked": ["w_q", "w_o"], "expert_parallel": true}, ...]}

so a reader builds the model without the job's preset or continual sections, and knows which MoE
sub-layers hold experts that were sharded over ranks (``expert_parallel``: their optimizer state sits
in DeepSpeed's expert shards). A tag written before the record existed is read from its job.yaml (the
model section grown by the continual section; attention experts sharded unless
``parallel.replicate_attention_experts``).
"""

from __future__ import annotations

import json
import os
from typing import Optional

import yaml

from molm_ds.checkpoint.layout import JOB_FILE, MODEL_RECORD
from molm_ds.errors import CheckpointError

__all__ = ["read_job", "model_record", "write_model_record", "read_model_record", "model_config"]


def read_job(ckpt_dir: str, tag: str) -> dict:
    """The job.yaml of a tag, as a dict."""
    job_file = os.path.join(ckpt_dir, tag, JOB_FILE)
    if not os.path.isfile(job_file):
        raise CheckpointError(f"{job_file} missing: not a molm-ds checkpoint (written by launch/pretrain.py, "
                              "launch/prune.py or molm_ds.continual.grow_checkpoint)")
    with open(job_file) as f:
        return yaml.safe_load(f) or {}


def model_record(model, *, expert_parallel: Optional[set[str]] = None) -> dict:
    """The record of a MoLM (plain or expert-parallel). ``expert_parallel``: names of the sub-layers whose
    experts are sharded over ranks (None: every sub-layer, as a weights-only tag stores them)."""
    from molm_ds.model.sublayers import moe_sublayers, unwrap

    subs = moe_sublayers(model)
    return {"config": unwrap(model).config.model_dump(mode="json"),
            "sublayers": [{"name": s.name, "layer": s.layer, "kind": s.kind, "num_experts": int(s.module.num_experts),
                           "stacked": [n.rsplit(".", 1)[1] for n in s.stacked_params()],
                           "expert_parallel": expert_parallel is None or s.name in expert_parallel} for s in subs]}


def write_model_record(tag_dir: str, record: dict) -> None:
    with open(os.path.join(tag_dir, MODEL_RECORD), "w") as f:
        json.dump(record, f, indent=1)


def _from_job(ckpt_dir: str, tag: str) -> dict:
    """The record of a tag written before tags carried one, rebuilt from its job.yaml."""
    import torch

    from molm_ds.config import ModelConfig
    from molm_ds.model import MoLM
    from molm_ds.model.sublayers import ATTN, moe_sublayers

    raw = read_job(ckpt_dir, tag)
    section = raw.get("model") or {}
    try:
        cfg = ModelConfig.from_preset(section.get("preset", "tiny"), **(section.get("overrides") or {}))
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{os.path.join(ckpt_dir, tag, JOB_FILE)}: model section does not build ({exc})") from None
    cont = raw.get("continual") or {}
    cfg = cfg.grown(attention=int(cont.get("attention", 0)), mlp=int(cont.get("mlp", 0)))
    replicated = bool((raw.get("parallel") or {}).get("replicate_attention_experts", False))
    with torch.device("meta"):
        model = MoLM(cfg)
    return model_record(model, expert_parallel={s.name for s in moe_sublayers(model)
                                                if not (replicated and s.kind == ATTN)})


def read_model_record(ckpt_dir: str, tag: str) -> dict:
    """The tag's model record (rebuilt from its job.yaml for a tag written before records existed)."""
    path = os.path.join(ckpt_dir, tag, MODEL_RECORD)
    if not os.path.isfile(path):
        return _from_job(ckpt_dir, tag)
    try:
        with open(path) as f:
            record = json.load(f)
        record["config"], record["sublayers"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path} is unreadable ({exc}): the checkpoint is damaged") from None
    return record


def model_config(ckpt_dir: str, tag: str):
    """The ModelConfig of the model a tag holds."""
    from molm_ds.config import ModelConfig

    record = read_model_record(ckpt_dir, tag)
    try:
        return ModelConfig(**record["config"])
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{os.path.join(ckpt_dir, tag, MODEL_RECORD)}: the model config does not build "
                              f"({exc})") from None
