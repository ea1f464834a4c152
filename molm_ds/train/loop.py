"""The training loop: checks -> build -> resume -> steps (log / evaluate / save).

    summary = train(load_job("configs/demo.yaml"))                  # pretraining, init_from, finetune
    summary = train(job, recipe=ContinualRecipe(job))                 # or molm_ds.jobs.run(job)

Every rank runs the same code in the same order:
1. the process group, then every check a user's mistake can fail (``preflight``), before any model;
2. the model on the job seed (identical weights everywhere), expert parallelism (``parallelize``),
   param groups, the optimizer, ``deepspeed.initialize``;
3. resume (weights, optimizer, data position, RNG, counters) if asked;
4. steps (``train_step``: no host sync of its own), then, on their steps, evaluation, the metrics row
   (progress line, metrics.jsonl, TensorBoard) and checkpoints.
What differs between job kinds is the recipe (``molm_ds.train.recipe``).
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np
import torch

from molm_ds.errors import UserError
from molm_ds.storage import StorageError, as_storage_error, atomic_write_text
from molm_ds.log import get_logger, info0
from molm_ds import checkpoint as ckpt, heap, rundir
from molm_ds.parallel import comm
from molm_ds.parallel.peers import PeerWatch
from molm_ds.train.determinism import deterministic_mode
from molm_ds.train.distributed import DEFAULT_COLLECTIVE_TIMEOUT_S, apply_collective_timeout, init_distributed
from molm_ds.train.engine import build_engine, compile_model, set_lr
from molm_ds.train.evaluate import evaluate
from molm_ds.train.job import JobConfig
from molm_ds.train.metrics import MetricsHook, StepLog
from molm_ds.train.preempt import StopRequests
from molm_ds.train.preflight import preflight
from molm_ds.train.recipe import Recipe, Run
from molm_ds.train.step import train_step

log = get_logger("train")

__all__ = ["train", "NonFiniteLossError", "CLIENT_KEY"]

CLIENT_KEY = "molm_ds"  # our client_state lives under one key (DeepSpeed reserves names like skipped_steps)


class NonFiniteLossError(UserError, RuntimeError):
    """Too many steps in a row with non-finite gradients."""


@dataclass
class TrainState:
    """What a checkpoint carries besides DeepSpeed's own state."""

    step: int = 0
    skipped_steps: int = 0
    nonfinite_in_a_row: int = 0

    def after_step(self, applied: bool, limit: int) -> None:
        if applied:
            self.nonfinite_in_a_row = 0
            return
        self.skipped_steps += 1
        self.nonfinite_in_a_row += 1
        log.warning("step %d: non-finite gradients on some rank; step skipped (%d in a row)", self.step,
                    self.nonfinite_in_a_row)
        if self.nonfinite_in_a_row >= limit:
            raise NonFiniteLossError(f"{self.nonfinite_in_a_row} non-finite steps in a row (training.max_nonfinite_in_a_row="
                                     f"{limit}); lower training.lr or check the data")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    name = get_accelerator().device_name()
    return torch.device("cpu") if name == "cpu" else torch.device(name, int(os.environ.get("LOCAL_RANK", 0)))


def _resume(run: Run, target: tuple[str, str], ep_info) -> TrainState:
    client = ckpt.load(run.engine, *target, ep_info=ep_info).get(CLIENT_KEY)
    if client is None:
        raise ckpt.CheckpointError(f"{os.path.join(*target)} has no {CLIENT_KEY!r} client state: not written by the "
                                   "molm-ds trainer (to start from its weights only, use init_from)")
    if not run.job.allow_data_change:  # else the data order starts afresh (preflight said what changed)
        run.data.train.load_state_dict(client["data"])
    info0(f"resumed from {os.path.join(*target)} at step {client['step']}")
    return TrainState(client["step"], client["skipped_steps"], client["nonfinite_in_a_row"])


def _save(run: Run, state: TrainState, ep_info) -> Optional[str]:
    """A checkpoint of this step, unless the run is in a non-finite streak: such a state is no resume
    target (resuming it would repeat the streak), so the save waits for the next finite step."""
    job = run.job
    if state.nonfinite_in_a_row:
        log.warning("step %d: not saving a checkpoint during a non-finite streak (%d in a row)", state.step,
                    state.nonfinite_in_a_row)
        return None
    client = {CLIENT_KEY: {"step": state.step, "skipped_steps": state.skipped_steps,
                           "nonfinite_in_a_row": state.nonfinite_in_a_row, "data": run.data.train.state_dict(),
                           "job": job.model_dump(mode="json")}}
    return ckpt.save(run.engine, job.checkpoint_dir, state.step, client, job_yaml=job.to_yaml(), ep_info=ep_info,
                     keep=job.checkpoint.keep, elastic=job.checkpoint.elastic)


def _resume_hint(job: JobConfig) -> str:
    """Which checkpoint a resume would continue from, read from disk (this rank alone: others may be gone)."""
    try:
        target = ckpt.resolve_resume("auto", job.checkpoint_dir)
    except Exception:  # the disk is failing; the hint is a courtesy
        target = None
    if target is None:
        return "no complete checkpoint was written yet"
    return f"the newest complete checkpoint is {os.path.join(*target)}: continue from it with --resume auto"


def train(job: JobConfig, *, recipe: Optional[Recipe] = None, hooks: Iterable[MetricsHook] = ()) -> dict:
    """Run a job to ``training.steps`` on every rank (or until a stop signal: ``summary["stopped"]``);
    returns a summary of what was written."""
    recipe = recipe if recipe is not None else Recipe(job)
    c = job.checkpoint

    with deterministic_mode(job.training.deterministic):  # before the process group: cuBLAS reads its env once
        # 1. processes, then every check -- before any work
        timeout_s = job.parallel.collective_timeout_s or DEFAULT_COLLECTIVE_TIMEOUT_S
        rank, world = init_distributed(timeout_s)
        job = job.at_world_size(world)  # grad_accum_steps from training.global_batch_size, if set
        pre = preflight(job, recipe, rank, world)
        stops = StopRequests(c.preempt_signals)
        peers = PeerWatch(timeout_s).start()
        try:
            return _train(job, recipe, rank, world, pre, stops, hooks, peers)
        except Exception as exc:
            # a lost peer: one line on every survivor instead of a backend traceback
            tag = ckpt.newest_complete(job.checkpoint_dir)
            lost = peers.explain(exc, last_checkpoint=tag and os.path.join(job.checkpoint_dir, tag))
            if lost is not None:
                raise lost from None
            # a full or failing disk: say where the run can continue from
            err = as_storage_error(exc) if isinstance(exc, (OSError, RuntimeError)) else None
            if err is None:
                raise
            raise StorageError(f"{err}; {_resume_hint(job)}") from None
        finally:
            heap.release()
            peers.close()
            stops.close()
            if pre.lock is not None:
                pre.lock.release()


def _train(job: JobConfig, recipe: Recipe, rank: int, world: int, pre, stops: StopRequests, hooks,
           peers: PeerWatch) -> dict:
    from molm_ds import parallel

    t, c = job.training, job.checkpoint

    # 2. build: the same weights on every rank, then this rank's experts
    seed_everything(t.seed)
    model = recipe.build_model()
    model.activation_checkpointing = t.activation_checkpointing
    ep_info = parallel.parallelize(model, job.parallel.ep_size,
                                   replicate_attention_experts=job.parallel.replicate_attention_experts)
    engine = build_engine(job, recipe, model, pre.ds_config)
    if t.compile:
        compile_model(engine, job)
    seed_everything(t.seed + 1 + rank)  # per-rank streams for training-time randomness (sample_topk, dropout)
    run = Run(job, engine, _device(), pre.data, rank, world)

    # 3. resume
    state = _resume(run, pre.resume_from, ep_info) if pre.resume_from is not None else TrainState()
    if state.step >= t.steps:
        log.warning("checkpoint step %d >= training.steps %d: nothing to train", state.step, t.steps)
    steplog = StepLog(job, engine, hooks, resume_step=state.step, world=world)
    heap.release()  # start-up is over: what it built is frozen, the collector runs again (molm_ds.heap)
    steplog.write(0, recipe.start(run, resumed=pre.resume_from is not None))
    if rank == 0:
        atomic_write_text(os.path.join(job.run_dir, rundir.JOB), job.to_yaml(), what=rundir.JOB)
    info0(steplog.banner(state.step))

    # every group exists now (expert-parallel ones made while building, then the control group): from here
    # on every collective gives up after the collective timeout
    comm.init_control_group()
    apply_collective_timeout(peers.timeout_s)

    # 4. steps
    last_saved, t_start, first, stopped = None, time.time(), state.step, None
    while state.step < t.steps:
        state.step += 1
        peers.beat(state.step)  # the stall watchdog, re-armed
        factor = set_lr(engine, job, state.step)
        sums, reduced = train_step(engine, run.data.train.next_batch, recipe, run.device, t.grad_accum_steps)
        state.after_step(engine.was_step_applied(), t.max_nonfinite_in_a_row)
        extra = {}
        if t.eval_interval and (state.step % t.eval_interval == 0 or state.step == t.steps):
            val = evaluate(engine.module, run.data.val_batches())
            extra = {"val_loss": val.loss, "val_ppl": val.ppl, **recipe.evaluate(run)}
        if state.step == t.steps:
            extra.update(recipe.finish(run, state.step))
        steplog.step(state, sums, reduced, lr=t.lr * factor, extra=extra)
        stop = parallel.comm.any_rank(stops.reason is not None)  # CPU collective: every rank stops at this step
        if (c.interval and state.step % c.interval == 0) or (state.step == t.steps and c.save_final) or stop:
            last_saved = _save(run, state, ep_info) or last_saved
        if stop and state.step < t.steps:
            stopped = stops.reason or "another rank was asked to stop"
            info0(f"stopped at step {state.step} ({stopped}); checkpoint {last_saved}: continue with --resume auto")
            break

    steplog.close()
    parallel.comm.barrier()
    return {"step": state.step, "loss": steplog.last.get("loss"), "val_loss": steplog.last.get("val_loss"),
            "skipped_steps": state.skipped_steps, "run_dir": job.run_dir, "metrics": steplog.metrics_path,
            "tensorboard_dir": job.tensorboard_dir if job.monitor.tensorboard else None,
            "checkpoint_dir": job.checkpoint_dir, "last_checkpoint": last_saved, "steps_run": state.step - first,
            "stopped": stopped, "seconds": time.time() - t_start}
