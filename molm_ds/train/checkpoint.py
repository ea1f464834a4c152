"""Checkpoints in DeepSpeed's layout, a completeness marker, newest-complete lookup, RNG states.

    <checkpoint.dir>/
      latest                          DeepSpeed's pointer to the newest tag
      step_00000100/                  one tag per save
        mp_rank_00_model_states.pt    non-expert weights + client_state (step, loader state, job config)
        layer_{L}_expert_{E}_mp_rank_00_model_states.pt   one file per global expert (molm_ds.parallel bridge)
        *optim_states.pt              optimizer shards
        rng_rank{r}.pt                python / numpy / torch RNG state of rank r
        job.yaml                      the job, readable
        COMPLETE                      written by rank 0 after a barrier once every rank finished

A tag without COMPLETE is partial (a run killed while saving) and is never resumed from.
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

from molm_ds.log import get_logger

log = get_logger("train.checkpoint")

__all__ = ["COMPLETE", "tag_for", "step_of", "list_tags", "is_complete", "newest_complete",
           "resolve_resume", "save", "load", "rng_state", "set_rng_state", "CheckpointError"]

COMPLETE = "COMPLETE"
_TAG = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing or partial where one was asked for."""


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


def resolve_resume(resume: Optional[str], ckpt_dir: str) -> Optional[tuple[str, str]]:
    """(checkpoint dir, tag) to resume from, or None for a fresh start.

    ``auto``: the newest complete tag in ckpt_dir; no tags at all = fresh start (logged); tags but none
    complete = error. A path: a checkpoint directory (its newest complete tag) or a tag directory
    (which must be complete); missing or partial = error.
    """
    if resume is None:
        return None
    if resume == "auto":
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
    path = os.path.normpath(resume)
    if not os.path.exists(path):
        raise CheckpointError(f"resume: {resume} does not exist; give a checkpoint directory, a step_NNNNNNNN tag "
                              "directory in it, or resume: auto")
    if _TAG.match(os.path.basename(path)):
        parent, tag = os.path.dirname(path) or ".", os.path.basename(path)
        if not is_complete(parent, tag):
            raise CheckpointError(f"resume: {path} is a partial checkpoint (no {COMPLETE} marker: a rank did not finish "
                                  f"writing); resume from an older complete tag: {newest_complete(parent)}")
        return parent, tag
    tag = newest_complete(path)
    if tag is None:
        raise CheckpointError(f"resume: no complete checkpoint in {path} (tags found: {list_tags(path) or 'none'})")
    return path, tag


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


# ---- save / load ---------------------------------------------------------------------------------
def save(engine, ckpt_dir: str, step: int, client_state: dict, *, job_yaml: str, ep_info=None, keep: int = 0) -> str:
    """Save on every rank (collective); rank 0 writes COMPLETE after a barrier. Returns the tag."""
    import torch.distributed as dist

    tag = tag_for(step)
    rank, world = dist.get_rank(), dist.get_world_size()
    t0 = time.time()
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client_state)
    torch.save(rng_state(), _rng_file(ckpt_dir, tag, rank))
    dist.barrier()  # every rank's files are on disk
    if rank == 0:
        if ep_info is not None:
            from molm_ds.parallel import check_expert_files

            check_expert_files(ckpt_dir, tag, ep_info)
        with open(os.path.join(ckpt_dir, tag, "job.yaml"), "w") as f:
            f.write(job_yaml)
        with open(os.path.join(ckpt_dir, tag, COMPLETE), "w") as f:
            json.dump({"step": step, "world_size": world, "time": time.time()}, f)
        if keep > 0:
            for old in [t for t in list_tags(ckpt_dir) if is_complete(ckpt_dir, t)][:-keep]:
                shutil.rmtree(os.path.join(ckpt_dir, old), ignore_errors=True)
    dist.barrier()  # nobody reads a checkpoint before it is marked
    log.info("saved checkpoint %s in %.1fs", os.path.join(ckpt_dir, tag), time.time() - t0)
    return tag


def load(engine, ckpt_dir: str, tag: str) -> dict:
    """Load weights, optimizer state and this rank's RNG; returns the client_state."""
    import torch.distributed as dist

    if not is_complete(ckpt_dir, tag):
        raise CheckpointError(f"{os.path.join(ckpt_dir, tag)} is partial (no {COMPLETE} marker)")
    path, client_state = engine.load_checkpoint(ckpt_dir, tag=tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=False)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load {os.path.join(ckpt_dir, tag)}")
    rng = _rng_file(ckpt_dir, tag, dist.get_rank())
    if os.path.isfile(rng):
        set_rng_state(torch.load(rng, weights_only=False))
    else:
        log.warning("%s missing (saved with a different world size?): RNG streams restart from the seed", rng)
    return client_state
