"""Training: job config (YAML), DeepSpeed config handling, the loop, checkpoints and exact resume.

Public API: ``load_job``, ``JobConfig``, ``train``, ``build_ds_config`` and ``checkpoint``
(``resolve_resume``, ``newest_complete``). See docs/training.md.
"""

from molm_ds.train.job import JobConfig, JobConfigError, apply_overrides, job_from_dict, load_job

__all__ = ["JobConfig", "JobConfigError", "apply_overrides", "job_from_dict", "load_job", "train"]


def train(job, **kwargs):
    """Lazy wrapper around ``molm_ds.train.loop.train`` (importing the loop pulls in DeepSpeed)."""
    from molm_ds.train.loop import train as _train

    return _train(job, **kwargs)
