"""Every check that a user's mistake can fail, in one place, before any model is built.

Called on every rank right after the process group starts (the checks that need the world size
need it): the ds_config (keys, batch sizes, ZeRO stage), expert parallelism against the world size
and the expert counts, the resume target and whether it fits this job, the recipe's own checks
(``init_from``), the data (shard directories open, tokenizer fits the vocabulary) and the run
directory (one job at a time: a lock; a fresh start over an earlier run is refused unless
``overwrite``). Each failure is a ``UserError`` whose message says what to change; the entry point
prints it as one ``error:`` line.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

from molm_ds.errors import CheckpointError, ConfigError, UserError
from molm_ds.paths import ensure_writable_dir
from molm_ds import checkpoint as ckpt, rundir
from molm_ds.storage import StorageError, as_storage_error
from molm_ds.train.data import TrainData, check_vocab
from molm_ds.train.ds_config import build_ds_config, zero_stage
from molm_ds.checkpoint import RunLock
from molm_ds.train.job import JobConfig

__all__ = ["Preflight", "preflight"]


@dataclass
class Preflight:
    ds_config: dict  # the filled ds_config handed to deepspeed.initialize
    resume_from: Optional[tuple[str, str]]  # (checkpoint dir, tag) or None for a fresh start
    data: TrainData
    lock: Optional[RunLock]  # held by rank 0 for the whole job


def _check_expert_parallel(job: JobConfig, world: int) -> None:
    from molm_ds.parallel.groups import check_expert_parallel

    counts = job.build_model_config().expert_parallel_counts(
        replicate_attention_experts=job.parallel.replicate_attention_experts)
    check_expert_parallel(ep_size=job.parallel.ep_size, world_size=world,
                          expert_counts={f"model {k}": n for k, n in counts.items()})


def current_topology(job: JobConfig, ds_cfg: dict, world: int) -> dict:
    return ckpt.topology(world_size=world, ep_size=job.parallel.ep_size,
                         replicate_attention_experts=job.parallel.replicate_attention_experts,
                         zero_stage=zero_stage(ds_cfg), bf16=bool((ds_cfg.get("bf16") or {}).get("enabled")))


def _data_settings(job: dict, world: Optional[int]) -> dict:
    """What fixes the data order of a run (from a job as a dict): a resume needs the same."""
    data, t = job.get("data") or {}, job.get("training") or {}
    sources = data.get("sources") or []
    weights = [float(s.get("weight", 1.0)) for s in sources]
    total = sum(weights) or 1.0
    out = {"data.seq_len": data.get("seq_len"), "data.val_fraction": data.get("val_fraction", 0.01),
           "training.seed": t.get("seed", 1234), "number of data sources": len(sources),
           "data source weights": [round(w / total, 9) for w in weights]}
    if world is not None:
        out["global batch"] = int(t.get("micro_batch_size", 0)) * int(t.get("grad_accum_steps", 1)) * int(world)
    return out


def _check_same_data(job: JobConfig, saved_job: dict, saved_world: Optional[int], world: int, where: str) -> None:
    """Refuse (unless allow_data_change) a resume whose data order cannot continue exactly; say what changed."""
    was = _data_settings(saved_job, saved_world)
    now = _data_settings(job.model_dump(mode="json"), world if saved_world is not None else None)
    changed = [f"{k} {was[k]} -> {now[k]}" for k in was if k in now and was[k] != now[k]]
    if changed and not job.allow_data_change:
        raise CheckpointError(f"resume: {where} was trained with other data settings ({'; '.join(changed)}), so the "
                              "data order cannot continue exactly: restore them, or pass --allow-data-change (job key "
                              "allow_data_change: true) to continue the weights and optimizer with a fresh data order")
    from molm_ds.log import info0

    if changed:
        info0(f"resume: data settings changed ({'; '.join(changed)}); allow_data_change: the data order starts afresh")
    t_was, t_now = saved_job.get("training") or {}, job.model_dump(mode="json")["training"]
    other = [f"training.{k} {t_was[k]} -> {t_now[k]}" for k in sorted(t_now)
             if k in t_was and t_was[k] != t_now[k] and k not in ("seed", "micro_batch_size", "grad_accum_steps")]
    if other:  # allowed (the schedule is a function of the step), but never silent
        info0(f"resume: {where} was trained with other settings, used from here on: {'; '.join(other)}")


def _check_resume_target(job: JobConfig, target: tuple[str, str], now: dict) -> None:
    d, tag = target
    where = os.path.join(d, tag)
    marker = ckpt.read_marker(d, tag)
    kind = marker.get("kind", "pruned" if marker.get("pruned") else "grown" if marker.get("grown") else "train")
    if kind != "train":
        raise CheckpointError(f"resume: {where} holds weights only ({kind}), no optimizer or data state: start from "
                              f"it with init_from: {where} (and no resume)")
    have = ckpt.model_config(d, tag)
    if have != job.build_model_config():
        ckpt.check_same_model(have, job.build_model_config(), where=where, what="resume")
    was = marker.get("topology")
    _check_same_data(job, ckpt.read_job(d, tag), (was or {}).get("world_size"), now["world_size"], where)
    ckpt.check_resumable(d, tag, now, marker=marker)


def _earlier_run(job: JobConfig) -> list[str]:
    """What an earlier run left in run_dir that a fresh start would overwrite."""
    found = []
    metrics = os.path.join(job.run_dir, rundir.METRICS)
    if os.path.isfile(metrics) and os.path.getsize(metrics) > 0:
        found.append(metrics)
    tags = ckpt.list_tags(job.checkpoint_dir)
    if tags:
        found.append(f"{len(tags)} checkpoint(s) in {job.checkpoint_dir}")
    return found


def _clear_earlier_run(job: JobConfig) -> None:
    import shutil

    for name in rundir.RUN_OUTPUTS:
        if os.path.isfile(os.path.join(job.run_dir, name)):
            os.remove(os.path.join(job.run_dir, name))
    if os.path.isdir(job.tensorboard_dir):
        shutil.rmtree(job.tensorboard_dir)
    ckpt.retire_all(job.checkpoint_dir)


def _take_run_dir(job: JobConfig, rank: int, fresh: bool) -> Optional[RunLock]:
    """Rank 0 takes the run_dir's lock and refuses a fresh start over an earlier run (unless overwrite;
    ``resume: auto`` that finds no complete checkpoint is a fresh start too, refused the same way when an
    earlier run left files); every rank raises the same error."""
    from molm_ds.parallel import comm

    lock, error = None, None
    if rank == 0:
        try:
            ensure_writable_dir(job.run_dir, what="run_dir", error=ConfigError)
            ensure_writable_dir(job.checkpoint_dir, what="checkpoint.dir", error=ConfigError)
            lock = RunLock(job.run_dir, job_name=job.name)
            lock.acquire()
            earlier = _earlier_run(job) if fresh else []
            if earlier and not job.overwrite:
                how = ("--resume auto found no complete checkpoint to continue from in " + job.checkpoint_dir
                       + ", so this would start fresh: choose another run_dir, or pass --overwrite to delete it and "
                       "start over" if job.resume == "auto" else
                       "this job starts fresh: continue it with --resume auto, choose another run_dir, or pass "
                       "--overwrite to delete it and start over")
                raise ConfigError(f"run_dir {job.run_dir} holds an earlier run ({', '.join(earlier)}) and {how}")
            if earlier:
                _clear_earlier_run(job)
        except UserError as exc:  # a refusal, or the storage refusing the lock: every rank ends with it
            if lock is not None:
                lock.release()  # only removes the lock file if this job holds it
            lock, error = None, (type(exc).__name__, str(exc))
        except OSError as exc:
            err = as_storage_error(exc)
            if err is None:
                raise
            lock, error = None, ("StorageError", str(err))
    error = comm.broadcast_object(error)
    if error is not None:
        kind, message = error
        raise (StorageError if kind == "StorageError" else ConfigError)(message)
    return lock


def preflight(job: JobConfig, recipe, rank: int, world: int) -> Preflight:
    from molm_ds.parallel import comm

    comm.init_control_group()
    ds_cfg = build_ds_config(job, world)
    _check_expert_parallel(job, world)
    recipe.check()
    check_vocab(job)
    data = TrainData(job, rank, world)
    resume_from = ckpt.resolve_resume(job.resume, job.checkpoint_dir, collective=True)
    if resume_from is not None:
        _check_resume_target(job, resume_from, current_topology(job, ds_cfg, world))
    lock = _take_run_dir(job, rank, fresh=resume_from is None)
    return Preflight(ds_cfg, resume_from, data, lock)
