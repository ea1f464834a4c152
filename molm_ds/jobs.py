"""Run a job file the way ``launch/pretrain.py`` does: pick the recipe of the job, then train.

    from molm_ds.jobs import run
    summary = run(load_job("configs/continual_code_new_only.yaml"))

This module sits above ``molm_ds.train`` and ``molm_ds.continual`` (which depends on ``train``), so
neither imports the other backwards.
"""

from __future__ import annotations

from typing import Iterable

from molm_ds.train.job import JobConfig

__all__ = ["recipe_for", "run"]


def recipe_for(job: JobConfig):
    """``ContinualRecipe`` for a job with a ``continual`` section, else the pretraining ``Recipe`` (which
    also covers ``init_from`` warm starts and ``finetune``)."""
    if job.continual is not None:
        from molm_ds.continual.recipe import ContinualRecipe

        return ContinualRecipe(job)
    from molm_ds.train.recipe import Recipe

    return Recipe(job)


def run(job: JobConfig, *, hooks: Iterable = ()) -> dict:
    from molm_ds.train.loop import train

    return train(job, recipe=recipe_for(job), hooks=hooks)
