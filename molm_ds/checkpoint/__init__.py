"""molm-ds checkpoints: the one package that writes, finds, verifies and reads them. See docs/training.md.

- ``layout``: file and directory names of a checkpoint directory and its tags;
- ``marker``: the COMPLETE marker (sizes and digests), ``verify``, retiring old tags;
- ``resolve``: which tag a path or ``resume`` setting means;
- ``record``: what a tag says about itself (its job; ``model.json``: its model config and MoE sub-layers);
- ``consolidate`` / ``reader``: a plain single-process state dict / model from any topology's files
  (``ds_masters``: the fp32 masters in DeepSpeed's optimizer shards);
- ``writer``: a plain model as a weights-only tag (pruning, expert insertion, imports);
- ``optim_state``: topology-free optimizer state on disk (keys, pieces, resharding reads);
- ``trainer``: the trainer's save and resume through DeepSpeed's engine;
- ``lock``: one job per run directory.

Only ``trainer.save`` / ``trainer.load`` / ``load_weights`` and the collective ``verify`` touch the
process group or a DeepSpeed engine; everything else reads and writes files on one process.
"""

from molm_ds.checkpoint.consolidate import has_fp32_masters, read_fp32_state, read_model_state
from molm_ds.checkpoint.layout import (
    COMPLETE, JOB_FILE, MODEL_FILE, UNIVERSAL_DIR, check_expert_files, expert_file, list_expert_files, list_tags,
    step_of, tag_for,
)
from molm_ds.checkpoint.lock import LOCK_FILE, RunLock
from molm_ds.checkpoint.marker import file_digest, is_complete, newest_complete, read_marker, retire_all, verify
from molm_ds.checkpoint.reader import check_same_model, load_fp32_model, load_model
from molm_ds.checkpoint.record import model_config, read_job, read_model_record
from molm_ds.checkpoint.resolve import resolve, resolve_resume
from molm_ds.checkpoint.trainer import (
    can_load_natively, check_resumable, engine_topology, load, load_weights, rng_state, save, set_rng_state, topology,
)
from molm_ds.checkpoint.writer import model_section, write_model
from molm_ds.errors import CheckpointError

__all__ = [
    "COMPLETE", "MODEL_FILE", "JOB_FILE", "UNIVERSAL_DIR", "LOCK_FILE", "CheckpointError", "RunLock",
    "tag_for", "step_of", "list_tags", "expert_file", "list_expert_files", "check_expert_files",
    "is_complete", "newest_complete", "read_marker", "verify", "file_digest", "retire_all",
    "resolve", "resolve_resume", "read_job", "model_config", "read_model_record",
    "read_model_state", "has_fp32_masters", "read_fp32_state", "load_model", "load_fp32_model", "check_same_model",
    "model_section", "write_model",
    "save", "load", "load_weights", "rng_state", "set_rng_state", "topology", "engine_topology", "can_load_natively", "check_resumable",
]
