"""Trainer hooks for ``init_from`` / ``continual`` jobs (called from ``molm_ds.train.loop``).

    build_model(job)           starting model from init_from, grown by the continual section (plain, full)
    param_groups(job, model)   strategy -> frozen / masked params and per-group lrs (after parallelize)
    ContinualRun(job, ...)     checks before any work; then per micro-batch extra loss terms (A' penalty,
                               distillation), per step their metrics, and old/new-domain perplexity
                               before training (step 0) and at the last step, plus the run's report
                               ``<run_dir>/continual_report.{json,md}``.
"""

from __future__ import annotations

import json
import math
import os
from typing import Optional

import torch

from molm_ds.continual.groups import continual_param_groups
from molm_ds.continual.losses import distillation_kl, new_router_rows_penalty
from molm_ds.continual.surgery import (
    checkpoint_model_config, check_same_model, grow_experts, load_checkpoint_model, resolve_checkpoint,
)
from molm_ds.log import get_logger, info0, is_rank0

__all__ = ["build_model", "param_groups", "check_init_from", "ContinualRun", "REPORT_JSON"]

log = get_logger("continual")
REPORT_JSON = "continual_report.json"


def check_init_from(job) -> tuple[str, str]:
    """Resolve ``init_from`` and check that it holds the job's (starting) model; before any work."""
    ckpt_dir, tag = resolve_checkpoint(job.init_from)
    check_same_model(checkpoint_model_config(ckpt_dir, tag), job.model.build(), where=os.path.join(ckpt_dir, tag))
    return ckpt_dir, tag


def build_model(job) -> torch.nn.Module:
    """The starting model (weights of ``init_from``) with the continual section's new experts inserted."""
    model = load_checkpoint_model(job.init_from, expect=job.model.build())
    c = job.continual
    if c is not None:
        grow_experts(model, attention=c.attention, mlp=c.mlp,
                     seed=job.training.seed if c.init_seed is None else c.init_seed)
    assert model.config == job.build_model_config(), (model.config, job.build_model_config())
    return model


def param_groups(job, model: torch.nn.Module) -> list[dict]:
    c, t = job.continual, job.training
    return continual_param_groups(
        model, strategy=c.strategy, train_others=c.train_others, weight_decay=t.weight_decay,
        lr_new_experts=c.lr.new_experts or t.lr, lr_router=c.lr.router or t.lr, lr_others=c.lr.others or t.lr)


class _Domain:
    """What ``molm_ds.train.loop.evaluate`` needs: ``val()`` and ``eval_batches``."""

    def __init__(self, paths: list[str], kw: dict, eval_batches: int) -> None:
        from molm_ds.data import DataSource

        self.kw = {**kw, "sources": [DataSource(p) for p in paths]}
        self.eval_batches = eval_batches

    def val(self):
        from molm_ds.data import MixtureLoader

        return MixtureLoader(split="val", **self.kw)


class ContinualRun:
    """Per-run state of a continual job. Every method that talks to other ranks is called on all ranks."""

    def __init__(self, job, *, rank: int, world: int) -> None:
        self.job, self.rank, self.world = job, rank, world
        self.source = check_init_from(job)  # clear error before any model is built
        c = job.continual
        self.reg_weight = c.router_reg_weight if c else 0.0
        self.distill_weight = c.distill_weight if c else 0.0
        self.teacher: Optional[torch.nn.Module] = None
        self.sums = torch.zeros(2, dtype=torch.float64)  # router_reg, distill_kl
        self.n = 0
        self.domains: dict[str, _Domain] = {}

    # ---- set-up after deepspeed.initialize --------------------------------------------------------
    def start(self, engine, data, device) -> None:
        c = self.job.continual
        if c is not None:
            for name, paths in (("old", c.eval.old), ("new", c.eval.new)):
                if paths:
                    self.domains[name] = _Domain(paths, data.kw, data.eval_batches)
        if self.distill_weight > 0:
            self.teacher = load_checkpoint_model(self.job.init_from).to(device).eval().requires_grad_(False)
            info0("distillation: teacher = the starting model (frozen), weight %g" % self.distill_weight)

    # ---- loss terms ------------------------------------------------------------------------------
    def extra_loss(self, engine, input_ids_BT: torch.Tensor, logits_BTV: torch.Tensor) -> torch.Tensor:
        """router_reg_weight * sum ||A'||^2 + distill_weight * KL(teacher || model), for one micro-batch."""
        c = self.job.continual
        reg = new_router_rows_penalty(engine.module).to(logits_BTV.device)
        loss = self.reg_weight * reg if self.reg_weight else torch.zeros((), device=logits_BTV.device)
        kl = torch.zeros(())
        if self.teacher is not None:
            with torch.no_grad():
                teacher_logits = self.teacher(input_ids_BT).logits
            kl = distillation_kl(student_logits_BTV=logits_BTV, teacher_logits_BTV=teacher_logits,
                                 temperature=c.distill_temperature if c else 1.0)
            loss = loss + self.distill_weight * kl
        self.sums += torch.tensor([float(reg.detach()), float(kl.detach())], dtype=torch.float64)
        self.n += 1
        return loss

    def step_metrics(self) -> dict:
        """Means over this step's micro-batches and ranks (collective)."""
        import torch.distributed as dist

        v = torch.cat([self.sums, torch.tensor([float(self.n)], dtype=torch.float64)])
        dist.all_reduce(v)
        self.sums.zero_()
        self.n = 0
        out = {"router_reg": float(v[0] / v[2])} if v[2] > 0 else {}
        if self.teacher is not None and v[2] > 0:
            out["distill_kl"] = float(v[1] / v[2])
        return out

    # ---- evaluation and report -------------------------------------------------------------------
    def evaluate_domains(self, engine, device) -> dict:
        """{old_val_loss, old_val_ppl, new_val_loss, new_val_ppl} (collective; RNG untouched)."""
        from molm_ds.train.loop import evaluate

        out = {}
        for name, dom in self.domains.items():
            loss = evaluate(engine, dom, device)
            out[f"{name}_val_loss"] = loss
            out[f"{name}_val_ppl"] = math.exp(min(loss, 50.0))
        return out

    def _report_path(self) -> str:
        return os.path.join(self.job.run_dir, REPORT_JSON)

    def begin(self, engine, device, hooks, *, resumed: bool) -> None:
        """Before the first step of a fresh run: perplexities of the grown, untrained model (step 0 row)."""
        if not self.domains:
            return
        if resumed:
            self._carry_before_over()
            return
        before = self.evaluate_domains(engine, device)
        info0("continual: before training: " + ", ".join(f"{k} {v:.4f}" for k, v in before.items()))
        for hook in hooks:
            hook(0, before)
        if is_rank0():
            os.makedirs(self.job.run_dir, exist_ok=True)
            with open(self._report_path(), "w") as f:
                json.dump({"before": before}, f, indent=1)

    def _carry_before_over(self) -> None:
        """A resumed run in a new run_dir keeps the 'before' numbers of the run that wrote the checkpoint."""
        from molm_ds.train import checkpoint as ckpt

        if not is_rank0() or os.path.isfile(self._report_path()):
            return
        ckpt_dir, _ = ckpt.resolve_resume(self.job.resume, self.job.checkpoint_dir)
        src = os.path.join(os.path.dirname(os.path.abspath(ckpt_dir)), REPORT_JSON)
        if os.path.isfile(src):
            with open(src) as f:
                before = json.load(f).get("before", {})
            os.makedirs(self.job.run_dir, exist_ok=True)
            with open(self._report_path(), "w") as f:
                json.dump({"before": before}, f, indent=1)
        else:
            log.warning("continual: resumed without %s next to %s: the report will have no 'before' numbers",
                        REPORT_JSON, ckpt_dir)

    def finish(self, engine, device, step: int) -> dict:
        """At the last step: perplexities after training; writes the report (rank 0). Returns the metrics."""
        if not self.domains:
            return {}
        after = self.evaluate_domains(engine, device)
        if is_rank0():
            before = {}
            if os.path.isfile(self._report_path()):
                with open(self._report_path()) as f:
                    before = json.load(f).get("before", {})
            write_report(self.job, before=before, after=after, step=step, source=os.path.join(*self.source))
        return after


def write_report(job, *, before: dict, after: dict, step: int, source: str) -> None:
    c = job.continual
    report = {"job": job.name, "init_from": source, "step": step, "before": before, "after": after,
              "strategy": c.strategy if c else None, "new_experts": {"attention": c.attention, "mlp": c.mlp} if c else None,
              "model": job.build_model_config().model_dump()}
    with open(os.path.join(job.run_dir, REPORT_JSON), "w") as f:
        json.dump(report, f, indent=1)
    lines = [f"# continual report: {job.name}", "",
             f"init_from `{source}`, strategy `{report['strategy']}`, new experts per layer {report['new_experts']}, "
             f"{step} steps", "", "| domain | val loss before | after | ppl before | after |", "| --- | --- | --- | --- | --- |"]
    for d in ("old", "new"):
        if f"{d}_val_loss" in after:
            b = lambda k: f"{before[k]:.4f}" if k in before else "-"
            lines.append(f"| {d} | {b(d + '_val_loss')} | {after[d + '_val_loss']:.4f} | {b(d + '_val_ppl')} | "
                         f"{after[d + '_val_ppl']:.2f} |")
    with open(os.path.join(job.run_dir, "continual_report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
