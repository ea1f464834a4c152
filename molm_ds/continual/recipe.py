"""The continual-learning recipe: what a ``continual`` job changes in the training loop.

    build_model      the ``init_from`` model with the new experts inserted (``grow_experts``)
    param_groups     the strategy: frozen / row-masked parameters, per-group learning rates
    loss_terms       + ``router_reg`` (lambda * sum ||A'||^2) and ``distill_kl`` (KL to the starting
                     model), logged like every other term
    start / evaluate old- and new-domain validation perplexities and the share of routing on the new
    / finish         experts per domain (``molm_ds.continual.routing``) before the first step (step-0
                     row), at every evaluation and after the last step, and the run's report
                     ``<run_dir>/continual_report.{json,md}`` with the knobs that decide domain
                     separation (router learning rate, A' regulariser weight, strategy)
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch
from torch import Tensor, nn

from molm_ds import rundir
from molm_ds.continual.groups import continual_param_groups
from molm_ds.continual.losses import distillation_kl, new_router_rows_penalty
from molm_ds.continual.routing import KINDS, NewExpertShare
from molm_ds.continual.surgery import grow_experts
from molm_ds.errors import ConfigError
from molm_ds.log import get_logger, info0, is_rank0
from molm_ds import checkpoint as ckpt
from molm_ds.train.evaluate import evaluate
from molm_ds.train.recipe import Recipe, Run
from molm_ds.storage import atomic_write_text

__all__ = ["ContinualRecipe", "REPORT_JSON", "write_report"]

log = get_logger("continual")
REPORT_JSON = rundir.CONTINUAL_REPORT_JSON


class ContinualRecipe(Recipe):
    name = "continual"

    def __init__(self, job) -> None:
        if job.continual is None or job.init_from is None:
            raise ConfigError("ContinualRecipe needs a job with init_from and a continual section")
        super().__init__(job)
        self.teacher: Optional[nn.Module] = None

    # ---- build -------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        c = self.job.continual
        model = ckpt.load_fp32_model(self.job.init_from, what="init_from", check=False)
        grow_experts(model, attention=c.attention, mlp=c.mlp, seed=self.job.training.seed if c.init_seed is None else c.init_seed)
        if c.distill_weight > 0:
            self.teacher = ckpt.load_fp32_model(self.job.init_from, check=False).eval().requires_grad_(False)
            info0("distillation: teacher = the starting model (frozen), weight %g" % c.distill_weight)
        return model

    def param_groups(self, model: nn.Module) -> list[dict]:
        c, t = self.job.continual, self.job.training
        return continual_param_groups(
            model, strategy=c.strategy, train_others=c.train_others, weight_decay=t.weight_decay,
            lr_new_experts=c.lr.new_experts or t.lr, lr_router=c.lr.router or t.lr, lr_others=c.lr.others or t.lr)

    # ---- the loss ----------------------------------------------------------------------------
    def loss_terms(self, model: nn.Module, batch: dict, out) -> dict[str, tuple[float, Tensor]]:
        c = self.job.continual
        terms = super().loss_terms(model, batch, out)
        terms["router_reg"] = (c.router_reg_weight, new_router_rows_penalty(model).to(out.logits.device))
        if self.teacher is not None:
            if next(self.teacher.parameters()).device != out.logits.device:
                self.teacher.to(out.logits.device)
            with torch.no_grad():
                teacher_logits = self.teacher(batch["input_ids"].to(out.logits.device)).logits
            terms["distill_kl"] = (c.distill_weight, distillation_kl(
                student_logits_BTV=out.logits, teacher_logits_BTV=teacher_logits, temperature=c.distill_temperature))
        return terms

    # ---- old / new domains -------------------------------------------------------------------
    def _domains(self, run: Run) -> dict:
        """For each domain the job names: {d}_val_loss, {d}_val_ppl and {d}_new_mass_{attn,mlp},
        {d}_new_topk_{attn,mlp} (routing on the new experts), d = old / new (collective)."""
        out = {}
        for name, paths in (("old", self.job.continual.eval.old), ("new", self.job.continual.eval.new)):
            if paths:
                with NewExpertShare(run.model) as share:
                    r = evaluate(run.model, run.data.val_batches(paths))
                out[f"{name}_val_loss"], out[f"{name}_val_ppl"] = r.loss, r.ppl
                out.update({f"{name}_{k}": v for k, v in share.result().items()})
        return out

    def knobs(self) -> dict:
        """What decides whether the new experts stay on the new domain, as the job sets it."""
        c, t = self.job.continual, self.job.training
        return {"strategy": c.strategy, "lr_router": c.lr.router or t.lr, "lr_new_experts": c.lr.new_experts or t.lr,
                "lr_others": c.lr.others or t.lr, "router_reg_weight": c.router_reg_weight,
                "distill_weight": c.distill_weight, "train_others": c.train_others}

    def _report_path(self) -> str:
        return os.path.join(self.job.run_dir, REPORT_JSON)

    def start(self, run: Run, *, resumed: bool) -> dict[str, float]:
        """Before the first step of a fresh run: the grown, untrained model's perplexities (the step-0 row)."""
        info0("continual: " + ", ".join(f"{k} {v}" for k, v in self.knobs().items()))
        if resumed:
            self._carry_before_over()
            return {}
        before = self._domains(run)
        if before:
            info0("continual: before training: " + ", ".join(f"{k} {v:.4f}" for k, v in before.items()))
            if is_rank0():
                atomic_write_text(self._report_path(), json.dumps({"before": before}, indent=1), what="report")
        return before

    def _carry_before_over(self) -> None:
        """A resumed run in a new run_dir keeps the 'before' numbers of the run that wrote the checkpoint."""
        if not is_rank0() or os.path.isfile(self._report_path()) or not self.job.continual.eval.old + self.job.continual.eval.new:
            return
        ckpt_dir, _ = ckpt.resolve_resume(self.job.resume, self.job.checkpoint_dir)
        src = os.path.join(os.path.dirname(os.path.abspath(ckpt_dir)), REPORT_JSON)
        if os.path.isfile(src):
            with open(src) as f:
                before = json.load(f).get("before", {})
            atomic_write_text(self._report_path(), json.dumps({"before": before}, indent=1), what="report")
        else:
            log.warning("continual: resumed without %s next to %s: the report will have no 'before' numbers",
                        REPORT_JSON, ckpt_dir)

    def evaluate(self, run: Run) -> dict[str, float]:
        return self._domains(run)

    def finish(self, run: Run, step: int) -> dict[str, float]:
        after = self._domains(run)
        if after and is_rank0():
            before = {}
            if os.path.isfile(self._report_path()):
                with open(self._report_path()) as f:
                    before = json.load(f).get("before", {})
            write_report(self.job, knobs=self.knobs(), before=before, after=after, step=step,
                         source=os.path.join(*ckpt.resolve(self.job.init_from, what="init_from")))
        return after


def write_report(job, *, knobs: dict, before: dict, after: dict, step: int, source: str) -> None:
    c = job.continual
    report = {"job": job.name, "init_from": source, "step": step, "before": before, "after": after,
              "strategy": c.strategy, "knobs": knobs, "new_experts": {"attention": c.attention, "mlp": c.mlp},
              "model": job.build_model_config().model_dump()}
    atomic_write_text(os.path.join(job.run_dir, REPORT_JSON), json.dumps(report, indent=1), what="report")
    lines = [f"# continual report: {job.name}", "",
             f"init_from `{source}`, strategy `{report['strategy']}`, new experts per layer {report['new_experts']}, "
             f"{step} steps; router lr {knobs['lr_router']:g}, new-expert lr {knobs['lr_new_experts']:g}, "
             f"A' regulariser weight {knobs['router_reg_weight']:g}", "",
             "| domain | val loss before | after | ppl before | after | new-expert mass attn / mlp before | after |",
             "| --- | --- | --- | --- | --- | --- | --- |"]

    def share(row: dict, d: str) -> str:
        return " / ".join(f"{row[f'{d}_new_mass_{k}']:.3f}" if f"{d}_new_mass_{k}" in row else "-" for k in KINDS)

    for d in ("old", "new"):
        if f"{d}_val_loss" in after:
            b = lambda k: f"{before[k]:.4f}" if k in before else "-"
            lines.append(f"| {d} | {b(d + '_val_loss')} | {after[d + '_val_loss']:.4f} | {b(d + '_val_ppl')} | "
                         f"{after[d + '_val_ppl']:.2f} | {share(before, d)} | {share(after, d)} |")
    atomic_write_text(os.path.join(job.run_dir, rundir.CONTINUAL_REPORT_MD), "\n".join(lines) + "\n", what="report")
