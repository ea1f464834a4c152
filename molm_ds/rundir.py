"""The run directory's layout: every name a job and the tools after it write under ``run_dir``, once.

    <run_dir>/
      .molm_ds.lock            the job that holds the run directory (molm_ds.checkpoint.lock)
      job.yaml                 the validated job
      metrics.jsonl            one row per logged step (rank 0)
      expert_load.jsonl        full expert-share matrices at the heatmap steps (the monitor)
      continual_report.json    continual learning: before/after evaluation and routing (and .md)
      tensorboard/             TensorBoard events (default of monitor.tensorboard_dir)
      checkpoints/             the checkpoint directory (default of checkpoint.dir; molm_ds.checkpoint)
      report.png, report.html  python -m molm_ds.report RUN_DIR

    <prune --out>/             launch/prune.py
      frequencies.json, sweep.json, sweep.png, prune.json, checkpoints/, hf/
"""

from __future__ import annotations

import os

__all__ = [
    "LOCK", "JOB", "METRICS", "EXPERT_LOAD", "CONTINUAL_REPORT_JSON", "CONTINUAL_REPORT_MD", "TENSORBOARD", "CHECKPOINTS",
    "REPORT_PNG", "REPORT_HTML", "HF", "FREQUENCIES_JSON", "SWEEP_JSON", "SWEEP_PNG", "PRUNE_JSON",
    "RUN_OUTPUTS", "checkpoint_dir", "tensorboard_dir",
]

LOCK = ".molm_ds.lock"
JOB = "job.yaml"
METRICS = "metrics.jsonl"
EXPERT_LOAD = "expert_load.jsonl"
CONTINUAL_REPORT_JSON = "continual_report.json"
CONTINUAL_REPORT_MD = "continual_report.md"
TENSORBOARD = "tensorboard"
CHECKPOINTS = "checkpoints"
REPORT_PNG = "report.png"
REPORT_HTML = "report.html"
HF = "hf"
FREQUENCIES_JSON = "frequencies.json"
SWEEP_JSON = "sweep.json"
SWEEP_PNG = "sweep.png"
PRUNE_JSON = "prune.json"

# What a training job writes into run_dir beside its tensorboard and checkpoint directories: a fresh
# start with --overwrite deletes exactly these.
RUN_OUTPUTS = (METRICS, EXPERT_LOAD, CONTINUAL_REPORT_JSON, CONTINUAL_REPORT_MD)


def checkpoint_dir(run_dir: str) -> str:
    return os.path.join(run_dir, CHECKPOINTS)


def tensorboard_dir(run_dir: str) -> str:
    return os.path.join(run_dir, TENSORBOARD)
