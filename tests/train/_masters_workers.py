"""Rank worker for tests/train/test_ds_masters.py: train the tiny job and capture the engine's own fp32
master of every parameter at the last step (just before the final save writes them)."""

from __future__ import annotations

import torch

from molm_ds.train.recipe import Recipe


class CaptureMasters(Recipe):
    captured: dict

    def finish(self, run, step):
        opt = run.engine.optimizer
        if hasattr(opt, "fp16_groups") and hasattr(opt, "fp32_groups"):  # ZeRO 0: DeepSpeed's unfused fp16/bf16 optimizer
            by_id = {id(lp): hp for lows, highs in zip(opt.fp16_groups, opt.fp32_groups) for lp, hp in zip(lows, highs)}
            self.captured = {n: by_id[id(p)].detach().clone() for n, p in run.model.named_parameters()}
        else:  # ZeRO 1/2: DeepSpeed's own accessor (a collective over the parameter's data-parallel group)
            from deepspeed.utils import safe_get_full_fp32_param

            self.captured = {n: safe_get_full_fp32_param(p).detach().clone() for n, p in run.model.named_parameters()}
        return {}


def train_and_capture(rank: int, world_size: int, overrides: list[str]) -> dict:
    from molm_ds.train import load_job
    from molm_ds.train.loop import train
    from molm_ds.testing import TINY_JOB

    torch.set_num_threads(1)
    job = load_job(TINY_JOB, overrides)
    recipe = CaptureMasters(job)
    train(job, recipe=recipe)
    info = job.model.build()
    return {"masters": recipe.captured, "ep_size": job.parallel.ep_size, "n_layer": info.n_layer}
