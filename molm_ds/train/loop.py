"""The training loop: parse -> build -> loop -> save.

    summary = train(load_job("configs/demo.yaml"))

Every rank runs the same code. Order matters and is the same on all ranks:
1. process group (``distributed.init_distributed``), then every config check that needs the world size
   (ep_size | world, batch keys, ZeRO stage) and the resume target — all before any model is built;
2. model on the job seed (identical weights everywhere), ``parallelize`` (expert parallelism), param
   groups split with DeepSpeed's MoE helper, AdamW (DeepSpeedCPUAdam with optimizer offload),
   ``deepspeed.initialize``;
3. resume (weights, optimizer, loader state, RNG) if asked;
4. steps: ``grad_accum_steps`` micro-batches of forward -> loss = CE + sum(w * aux) -> backward; the
   non-finite check is an all-reduced flag per micro-batch, so every rank skips the same step;
5. metrics (reduced over ranks) to every hook; validation; checkpoints.

Extension points for later sections: ``build_model`` (init_from), ``param_groups`` (continual),
``loss_weights`` (finetune), and the ``hooks`` argument (monitoring).
"""

from __future__ import annotations

import math
import os
import random
import time
from contextlib import contextmanager
from typing import Iterable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from molm_ds.log import get_logger, info0
from molm_ds.model import AUX_KEYS, MoLM
from molm_ds.train import checkpoint as ckpt
from molm_ds.train.distributed import init_distributed
from molm_ds.train.ds_config import build_ds_config, offloads_optimizer
from molm_ds.train.job import JobConfig
from molm_ds.monitor import TrainingMonitor
from molm_ds.train.metrics import MetricsHook, MetricsWriter, format_progress
from molm_ds.train.schedule import lr_factor

log = get_logger("train")

__all__ = ["train", "lm_loss", "total_loss", "build_model", "param_groups", "loss_weights", "NonFiniteLossError"]


CLIENT_KEY = "molm_ds"  # our client_state lives under one key (DeepSpeed reserves names like skipped_steps)


class NonFiniteLossError(RuntimeError):
    """Too many non-finite steps in a row."""


# ---- pure pieces -----------------------------------------------------------------------------------
def lm_loss(*, logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in fp32 (labels -100 ignored)."""
    return F.cross_entropy(logits_BTV.float().flatten(0, 1), labels_BT.flatten(), ignore_index=-100)


def total_loss(*, lm: torch.Tensor, aux: dict, weights: dict) -> torch.Tensor:
    """CE + sum over aux terms of weight * term (terms with weight 0 add nothing)."""
    loss = lm
    for k, w in weights.items():
        if w:
            loss = loss + w * aux[k].float()
    return loss


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextmanager
def rng_preserved():
    """Run a block (validation) without moving any RNG stream, so resumed runs stay bit-identical."""
    state = ckpt.rng_state()
    try:
        yield
    finally:
        ckpt.set_rng_state(state)


# ---- build (extension points) ----------------------------------------------------------------------
def build_model(job: JobConfig) -> torch.nn.Module:
    if job.init_from is not None:  # warm start / continual learning: molm_ds.continual
        from molm_ds.continual import run as continual

        return continual.build_model(job)
    return MoLM(job.build_model_config())


def param_groups(job: JobConfig, model: torch.nn.Module) -> list[dict]:
    """Weight decay on matrices and stacked experts, none on norms and biases; split for MoE."""
    if job.continual is not None:  # frozen / masked params and per-group lrs: molm_ds.continual
        from molm_ds.continual import run as continual

        return continual.param_groups(job, model)
    from molm_ds.parallel import build_param_groups

    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    raw = [{"name": "decay", "params": decay, "weight_decay": job.training.weight_decay},
           {"name": "no_decay", "params": no_decay, "weight_decay": 0.0}]
    groups = build_param_groups([g for g in raw if g["params"]])
    for g in groups:
        g.setdefault("base_lr", job.training.lr)
    return groups


def loss_weights(job: JobConfig) -> dict[str, float]:
    w = job.training.loss_weights.model_dump()
    if job.finetune is not None:  # issue 7: load concentration H(m), on top of the other terms
        w["load_concentration"] += job.finetune.load_concentration_weight
    return w


def build_optimizer(job: JobConfig, groups: list[dict], ds_cfg: dict) -> torch.optim.Optimizer:
    t = job.training
    kw = dict(lr=t.lr, betas=tuple(t.betas), eps=t.eps, weight_decay=t.weight_decay)
    if offloads_optimizer(ds_cfg):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kw)
    return torch.optim.AdamW(groups, **kw)


# ---- the loop --------------------------------------------------------------------------------------
class _Data:
    def __init__(self, job: JobConfig, rank: int, world: int) -> None:
        from molm_ds.data import DataSource, MixtureLoader

        d = job.data
        self.kw = dict(sources=[DataSource(s.path, s.weight) for s in d.sources], seq_len=d.seq_len,
                       micro_batch_size=job.training.micro_batch_size, seed=job.training.seed, dp_rank=rank,
                       dp_world_size=world, val_fraction=d.val_fraction)
        self.train = MixtureLoader(split="train", **self.kw)
        self.eval_batches = d.eval_batches

    def val(self):
        from molm_ds.data import MixtureLoader

        return MixtureLoader(split="val", **self.kw)


def _check_vocab(job: JobConfig) -> None:
    """The sources are complete, share one tokenizer, and it fits the model (molm_ds.data.check_sources)."""
    from molm_ds.data import check_sources

    check_sources([s.path for s in job.data.sources], model_vocab_size=job.build_model_config().vocab_size)


def _all_reduce(x: torch.Tensor, op) -> torch.Tensor:
    import torch.distributed as dist

    dist.all_reduce(x, op=op)
    return x


def _grad_norm(engine) -> Optional[float]:
    g = engine.get_global_grad_norm()
    if g is None:
        return None
    g = float(g.item() if torch.is_tensor(g) else g)
    return g if math.isfinite(g) else None


def _poison_grads(engine) -> None:
    """Backward a NaN that reaches every trainable parameter: ZeRO-1/2 and the bf16 optimizer see an
    overflow and skip the step with their own bookkeeping; ZeRO-0 fp32 drops the gradients before the
    step (see ``_drop_grads``)."""
    params = [p for p in engine.module.parameters() if p.requires_grad]
    engine.backward(sum(p.sum() for p in params) * float("nan"))


def _drop_grads(engine) -> None:
    for p in engine.module.parameters():
        p.grad = None


def evaluate(engine, data: _Data, device) -> float:
    """Mean validation cross-entropy over ``eval_batches`` micro-batches per rank, averaged over ranks."""
    import torch.distributed as dist

    val = data.val()
    engine.eval()
    total = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad(), rng_preserved():
        for _ in range(data.eval_batches):
            b = val.next_batch()
            out = engine(b["input_ids"].to(device))
            total[0] += lm_loss(logits_BTV=out.logits, labels_BT=b["labels"].to(device)).double().cpu()
            total[1] += 1
    engine.train()
    _all_reduce(total, dist.ReduceOp.SUM)
    return float(total[0] / total[1])


def train(job: JobConfig, *, hooks: Iterable[MetricsHook] = ()) -> dict:
    """Run a job to ``training.steps``; returns a summary of what was written."""
    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    from molm_ds import parallel

    # 1. processes and every check that needs them -- before any work
    rank, world = init_distributed()
    ds_cfg = build_ds_config(job, world)
    parallel.check_zero_stage(ds_cfg)
    cfg = job.build_model_config()
    experts = {"mlp": cfg.n_mlp_experts} | ({} if job.parallel.replicate_attention_experts else {"att": cfg.n_att_experts})
    parallel.check_expert_parallel(ep_size=job.parallel.ep_size, world_size=world, expert_counts=experts)
    resume_from = ckpt.resolve_resume(job.resume, job.checkpoint_dir)
    _check_vocab(job)
    cl = None  # continual learning / warm start (molm_ds.continual.run): checks init_from here, before any work
    if job.init_from is not None:
        from molm_ds.continual.run import ContinualRun

        cl = ContinualRun(job, rank=rank, world=world)
    t = job.training
    device = torch.device(get_accelerator().device_name(), int(os.environ.get("LOCAL_RANK", 0))) \
        if get_accelerator().device_name() != "cpu" else torch.device("cpu")

    # 2. build
    seed_everything(t.seed)
    model = build_model(job)
    ep_info = parallel.parallelize(model, job.parallel.ep_size,
                                   replicate_attention_experts=job.parallel.replicate_attention_experts)
    groups = param_groups(job, model)
    optimizer = build_optimizer(job, groups, ds_cfg)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_cfg,
                                                   dist_init_required=False)
    parallel.fix_grad_clipping(engine)
    seed_everything(t.seed + 1 + rank)  # per-rank streams for training-time randomness
    data = _Data(job, rank, world)
    if cl is not None:
        cl.start(engine, data, device)
    weights = loss_weights(job)

    # 3. resume
    step, skipped, bad_in_a_row = 0, 0, 0
    if resume_from is not None:
        client = ckpt.load(engine, *resume_from).get(CLIENT_KEY)
        if client is None:
            raise ckpt.CheckpointError(f"{os.path.join(*resume_from)} has no {CLIENT_KEY!r} client state: not written "
                                       "by molm_ds.train (to start from its weights only, use init_from)")
        saved_model = client.get("job", {}).get("model")
        if saved_model is not None and saved_model != job.model.model_dump(mode="json"):
            raise ValueError(f"checkpoint {os.path.join(*resume_from)} was written for model {saved_model}, this job "
                             f"has {job.model.model_dump(mode='json')}: resume with the same model section")
        step, skipped, bad_in_a_row = client["step"], client["skipped_steps"], client["nonfinite_in_a_row"]
        data.train.load_state_dict(client["data"])
        info0(f"resumed from {os.path.join(*resume_from)} at step {step}")
        if step >= t.steps:
            log.warning("checkpoint step %d >= training.steps %d: nothing to train", step, t.steps)

    metrics_path = os.path.join(job.run_dir, "metrics.jsonl")
    # monitoring (molm_ds.monitor): the trainer's scalars and expert load through DeepSpeed's monitor
    monitor = TrainingMonitor.for_engine(
        engine, config=job.monitor.expert_load, run_dir=job.run_dir, tensorboard_dir=job.tensorboard_dir,
        flops_per_token=cfg.flops_per_token(job.data.seq_len)) if job.monitor.tensorboard else None
    hooks = [MetricsWriter(metrics_path, resume_step=step), *([monitor] if monitor else []), *hooks]
    if cl is not None:
        cl.begin(engine, device, hooks, resumed=resume_from is not None)  # old/new-domain perplexity at step 0
    if rank == 0:
        os.makedirs(job.run_dir, exist_ok=True)
        with open(os.path.join(job.run_dir, "job.yaml"), "w") as f:
            f.write(job.to_yaml())
    tokens_per_step = t.micro_batch_size * t.grad_accum_steps * world * job.data.seq_len
    info0(f"training {cfg.total_params:,} parameters ({cfg.active_params:,} active) on {world} rank(s), "
          f"ep_size {job.parallel.ep_size}, ZeRO-{ds_cfg.get('zero_optimization', {}).get('stage', 0)}, "
          f"{tokens_per_step:,} tokens/step, steps {step + 1}..{t.steps}")

    # 4. steps
    n_terms = 2 + len(AUX_KEYS)  # loss, lm_loss, aux...
    last_saved, last = None, {}
    # ZeRO-1/2 and the bf16 optimizer skip a step whose gradients are not finite; ZeRO-0 fp32 steps a
    # plain torch optimizer, which skips parameters without gradients.
    plain_optimizer = int(ds_cfg.get("zero_optimization", {}).get("stage", 0)) == 0 and not engine.bfloat16_enabled()
    t_start, steps_run = time.time(), 0
    while step < t.steps:
        step += 1
        t0 = time.time()
        factor = lr_factor(step, warmup_steps=t.warmup_steps, total_steps=t.steps, min_ratio=t.min_lr_ratio)
        for g in optimizer.param_groups:
            g["lr"] = g.get("base_lr", t.lr) * factor
        sums = torch.zeros(n_terms, dtype=torch.float64)
        bad = False
        for _ in range(t.grad_accum_steps):
            batch = data.train.next_batch()
            if bad:
                _poison_grads(engine)
            else:
                out = engine(batch["input_ids"].to(device))
                lm = lm_loss(logits_BTV=out.logits, labels_BT=batch["labels"].to(device))
                loss = total_loss(lm=lm, aux=out.aux, weights=weights)
                if cl is not None:  # A' penalty, distillation
                    loss = loss + cl.extra_loss(engine, batch["input_ids"].to(device), out.logits)
                flag = torch.tensor([0.0 if torch.isfinite(loss).item() else 1.0])
                bad = _all_reduce(flag, dist.ReduceOp.MAX).item() > 0
                if bad:
                    _poison_grads(engine)
                else:
                    engine.backward(loss)
                    sums += torch.tensor([loss.item(), lm.item(), *(out.aux[k].item() for k in AUX_KEYS)],
                                         dtype=torch.float64)
            if bad and plain_optimizer and engine.is_gradient_accumulation_boundary():
                _drop_grads(engine)
            engine.step()
        _all_reduce(sums, dist.ReduceOp.SUM)
        dt = time.time() - t0
        steps_run += 1
        if bad:
            skipped += 1
            bad_in_a_row += 1
            log.warning("step %d: non-finite loss on some rank; step skipped (%d in a row)", step, bad_in_a_row)
            if bad_in_a_row >= t.max_nonfinite_in_a_row:
                raise NonFiniteLossError(f"{bad_in_a_row} non-finite steps in a row (training.max_nonfinite_in_a_row="
                                         f"{t.max_nonfinite_in_a_row}); lower training.lr or check the data")
        else:
            bad_in_a_row = 0
        mean = (sums / (t.grad_accum_steps * world)).tolist()
        m = {"loss": None if bad else mean[0], "lm_loss": None if bad else mean[1]}
        m.update({k: (None if bad else v) for k, v in zip(AUX_KEYS, mean[2:])})
        m.update(lr=t.lr * factor, grad_norm=None if bad else _grad_norm(engine), tokens_per_s=tokens_per_step / dt,
                 skipped_steps=skipped)
        if t.eval_interval and (step % t.eval_interval == 0 or step == t.steps):
            m["val_loss"] = evaluate(engine, data, device)
            m["val_ppl"] = math.exp(min(m["val_loss"], 50.0))
        if cl is not None:  # collective: every rank, every step
            m.update(cl.step_metrics())
            if step == t.steps:
                m.update(cl.finish(engine, device, step))
        if step % job.monitor.log_interval == 0 or step in (1, t.steps) or "val_loss" in m:
            eta = (time.time() - t_start) / steps_run * (t.steps - step)
            info0(format_progress(step, t.steps, m, eta))
            for hook in hooks:
                hook(step, {k: v for k, v in m.items() if v is not None})
        last = m
        if job.checkpoint.interval and step % job.checkpoint.interval == 0 or (step == t.steps and job.checkpoint.save_final):
            client = {CLIENT_KEY: {"step": step, "skipped_steps": skipped, "nonfinite_in_a_row": bad_in_a_row,
                                   "data": data.train.state_dict(), "job": job.model_dump(mode="json")}}
            last_saved = ckpt.save(engine, job.checkpoint_dir, step, client, job_yaml=job.to_yaml(),
                                   ep_info=ep_info, keep=job.checkpoint.keep)

    # 5. summary
    if monitor is not None:
        monitor.close()
    dist.barrier()
    return {"step": step, "loss": last.get("loss"), "val_loss": last.get("val_loss"), "skipped_steps": skipped,
            "run_dir": job.run_dir, "metrics": metrics_path, "tensorboard_dir": job.tensorboard_dir if job.monitor.tensorboard else None,
            "checkpoint_dir": job.checkpoint_dir, "last_checkpoint": last_saved, "seconds": time.time() - t_start}
