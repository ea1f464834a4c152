"""Training: job config (YAML), preflight checks, the loop and its recipes, checkpoints, evaluation.

Public API: ``load_job``, ``JobConfig``, ``train`` (the loop; ``molm_ds.jobs.run`` picks the recipe of a
job), ``checkpoint`` (the layout owner). See docs/training.md.
"""

from molm_ds.train.job import JobConfig, JobConfigError, apply_overrides, job_from_dict, load_job

__all__ = ["JobConfig", "JobConfigError", "apply_overrides", "job_from_dict", "load_job", "train"]


def train(job, **kwargs):
    """Lazy wrapper around ``molm_ds.train.loop.train`` (importing the loop pulls in DeepSpeed)."""
    from molm_ds.train.loop import train as _train

    return _train(job, **kwargs)
