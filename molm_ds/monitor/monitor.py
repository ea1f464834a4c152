"""`TrainingMonitor`: what the training loop calls at each logged step (molm_ds.train wires it in).

    monitor = TrainingMonitor.for_engine(engine, config=MonitorConfig(...), run_dir=run_dir,
                                         flops_per_token=cfg.flops_per_token(seq_len))
    for step in ...:
        ... engine.backward(loss); engine.step()          # MoE forwards feed the expert-load sums
        if step % log_interval == 0:
            monitor(step, {"loss": ..., "lr": ..., "tokens_per_s": ...})   # every rank (a metrics hook)
    monitor.close()

Every rank calls it at the same steps with the same metric names (it runs collectives); rank 0
writes. Expert-load sums cover every training forward since the previous call.
Scalars go through DeepSpeed's monitor (the ds_config `tensorboard` block; `engine.monitor`), or through
a plain SummaryWriter in `tensorboard_dir` (default <run_dir>/tensorboard) when the ds_config has none. Per-expert shares,
histograms and heatmap images go to a SummaryWriter (DeepSpeed's monitor only takes scalars) in the
`expert_load` sub-directory of the same place, and the full share matrix goes to
<run_dir>/expert_load.jsonl at every heatmap step (the report's heatmap over time). All tags use the
optimizer step as their x axis (DeepSpeed's own `Train/Samples/*` tags use samples; ours never do).
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Callable, Mapping, Optional

from torch import nn

from molm_ds import rundir
from molm_ds.log import get_logger, is_rank0, warn_once
from molm_ds.model.moe import AUX_KEYS
from molm_ds.monitor.config import MonitorConfig
from molm_ds.monitor.expert_load import ExpertLoadTracker, SubLayer
from molm_ds.monitor.heatmap import render_heatmap, share_matrix
from molm_ds.parallel.comm import ReduceOp, reduce_metrics, world_size
from molm_ds.monitor.stats import LoadSums, RouterUnitSums, load_stats, relative_entropy, router_unit_stats
from molm_ds.monitor import tags

__all__ = ["TrainingMonitor", "DEFAULT_OPS", "mfu", "scalar_tag"]

log = get_logger("monitor")

# How the trainer's per-step metrics reduce across ranks. The loop in molm_ds.train already averages
# losses over ranks, so MEAN is exact for them (and right for a caller that passes per-rank values);
# lr / grad norm / loss scale / skipped steps / val_ppl are identical on every rank (DeepSpeed computes
# the global grad norm); tokens_per_s is global tokens over each rank's own step time, so ranks differ
# slightly and are averaged. Any other name must be declared by the caller (`ops=`).
DEFAULT_OPS: dict[str, ReduceOp] = {
    "loss": ReduceOp.MEAN,
    "lm_loss": ReduceOp.MEAN,
    "val_loss": ReduceOp.MEAN,
    "val_ppl": ReduceOp.RANK0,
    "lr": ReduceOp.RANK0,
    "grad_norm": ReduceOp.RANK0,
    "loss_scale": ReduceOp.RANK0,
    "skipped_steps": ReduceOp.RANK0,
    "tokens_per_s": ReduceOp.MEAN,
    "step_time_s": ReduceOp.MAX,
    **{k: ReduceOp.MEAN for k in AUX_KEYS},
}


def _default_op(name: str) -> Optional[ReduceOp]:
    return DEFAULT_OPS.get(name)


def scalar_tag(name: str) -> str:
    """Trainer metric name -> tag: val_loss -> val/loss, old_val_ppl -> val/old_ppl, mi -> train/aux/mi,
    loss -> train/loss."""
    m = re.match(r"^(?:(\w+?)_)?val_(\w+)$", name)
    if m:
        return "val/" + (f"{m.group(1)}_" if m.group(1) else "") + m.group(2)
    if name in AUX_KEYS:
        return "train/aux/" + name
    return "train/" + name


def mfu(*, tokens_per_s: float, flops_per_token: float, peak_flops: float, n_devices: int) -> float:
    """Model FLOPs utilisation: achieved training FLOP/s over the peak of all devices."""
    return tokens_per_s * flops_per_token / (peak_flops * n_devices)


class _WriterSink:
    """DeepSpeed-monitor-like `write_events([(tag, value, step)])` on a SummaryWriter (rank 0 only)."""

    def __init__(self, writer):
        self.writer = writer
        self.enabled = True

    def write_events(self, events) -> None:
        for tag, value, step in events:
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()


class TrainingMonitor:
    """Reduces per-step metrics and expert-load sums across ranks and writes them to TensorBoard."""

    def __init__(
        self,
        model: nn.Module,
        *,
        config: MonitorConfig = MonitorConfig(),
        run_dir: str,
        tensorboard_dir: Optional[str] = None,
        ds_monitor=None,
        flops_per_token: Optional[float] = None,
        loss_scale: Optional[Callable[[], Optional[float]]] = None,
        group=None,
    ):
        """model: holds the MoE sub-layers (hooked here). run_dir: gets expert_load.jsonl.
        tensorboard_dir: where scalars go when there is no DeepSpeed monitor (default <run_dir>/tensorboard).
        ds_monitor: DeepSpeed's MonitorMaster (`engine.monitor`). flops_per_token: for MFU.
        loss_scale: returns the current fp16 loss scale (None when not fp16). group: reduction group
        (default world: every data- and expert-parallel rank)."""
        self.config = config
        self.run_dir = run_dir
        self.group = group
        self.flops_per_token = flops_per_token
        self.loss_scale = loss_scale
        self._last_hist = self._last_heat = 0
        self.peak_flops = config.resolved_peak_flops()
        self.tracker = ExpertLoadTracker(model)
        self.rank0 = is_rank0()
        self._writer = None
        self._scalar_sink = None
        ds_tb = getattr(ds_monitor, "tb_monitor", None) if ds_monitor is not None else None
        self._ds_monitor = ds_monitor if ds_monitor is not None and getattr(ds_monitor, "enabled", False) else None
        if ds_tb is not None:
            self.tb_dir = os.path.join(ds_tb.output_path, ds_tb.job_name)
        else:
            self.tb_dir = tensorboard_dir or rundir.tensorboard_dir(run_dir)
        self.detail_dir = os.path.join(self.tb_dir, "expert_load")
        if self._ds_monitor is None and self.rank0:
            warn_once("TrainingMonitor: DeepSpeed's monitor is off (no ds_config 'tensorboard' block); "
                      f"scalars go to a SummaryWriter in {self.tb_dir}")
        if self.peak_flops is not None and flops_per_token is None:
            warn_once("TrainingMonitor: peak FLOPs set but no flops_per_token given: MFU is not logged")

    # ---- writers (rank 0) -----------------------------------------------------------------------
    def _detail_writer(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            os.makedirs(self.detail_dir, exist_ok=True)
            self._writer = SummaryWriter(log_dir=self.detail_dir)
        return self._writer

    def _scalars_out(self):
        if self._ds_monitor is not None:
            return self._ds_monitor
        if self._scalar_sink is None:
            from torch.utils.tensorboard import SummaryWriter

            os.makedirs(self.tb_dir, exist_ok=True)
            self._scalar_sink = _WriterSink(SummaryWriter(log_dir=self.tb_dir))
        return self._scalar_sink

    @classmethod
    def for_engine(cls, engine, *, config: MonitorConfig = MonitorConfig(), run_dir: str,
                   tensorboard_dir: Optional[str] = None, flops_per_token: Optional[float] = None,
                   group=None) -> "TrainingMonitor":
        """Monitor of a DeepSpeed engine: its module's MoE sub-layers, its monitor, its fp16 loss scale."""
        def loss_scale():
            if not engine.fp16_enabled():
                return None
            opt = engine.optimizer
            return getattr(opt, "cur_scale", None) or getattr(opt, "loss_scale", None)

        return cls(engine.module, config=config, run_dir=run_dir, tensorboard_dir=tensorboard_dir,
                   ds_monitor=engine.monitor, flops_per_token=flops_per_token, loss_scale=loss_scale, group=group)

    # ---- the per-step entry point -------------------------------------------------------------
    def __call__(self, step: int, metrics: Mapping[str, float]) -> None:
        """The training loop's metrics hook (molm_ds.train): its contract is that every value is already
        reduced over ranks and micro-batches, so each is declared RANK0 (no second reduction). The
        expert-load sums are still all-reduced here."""
        self.on_step(step, metrics, ops={k: ReduceOp.RANK0 for k in metrics})

    def on_step(
        self, step: int, metrics: Mapping[str, float], ops: Optional[Mapping[str, ReduceOp]] = None
    ) -> dict[str, float]:
        """Call on every rank at each logged step (same steps, same metric names on every rank): reduces
        the metrics (declared ops: DEFAULT_OPS, then `ops`) and the expert-load sums gathered since the
        last call; rank 0 writes them. Returns the scalars by tag, on every rank."""
        if not self.config.enabled:
            self.tracker.reset()
            return {}
        metrics = {k: float(v) for k, v in metrics.items() if v is not None}
        if self.loss_scale is not None and "loss_scale" not in metrics:
            ls = self.loss_scale()
            if ls is not None:
                metrics["loss_scale"] = float(ls)
        all_ops = {k: ReduceOp(op) for k in metrics if (op := (ops or {}).get(k) or _default_op(k)) is not None}
        reduced = reduce_metrics(metrics, all_ops, self.group)
        scalars = {scalar_tag(k): v for k, v in reduced.items()}
        if "val_loss" in reduced and "val_ppl" not in reduced:
            scalars["val/ppl"] = math.exp(min(reduced["val_loss"], 50.0))
        if "tokens_per_s" in reduced and self.peak_flops and self.flops_per_token:
            scalars["train/mfu"] = mfu(
                tokens_per_s=reduced["tokens_per_s"], flops_per_token=self.flops_per_token,
                peak_flops=self.peak_flops, n_devices=world_size(self.group),
            )
        sums, units = self.tracker.reduce_with_router_units(self.group)
        self.tracker.reset()
        if not any(float(s.tokens) > 0 for s in sums.values()):
            sums, units = {}, {}  # no training forward since the last call (e.g. a step-0 evaluation row)
        for sub, s in sums.items():
            for stat, v in load_stats(s).items():
                scalars[tags.stat_tag(sub, stat)] = v
        scalars.update(self._router_health(step, sums, units))
        hist = step // self.config.histogram_every > self._last_hist // self.config.histogram_every
        heat = step // self.config.heatmap_every > self._last_heat // self.config.heatmap_every
        if hist:
            self._last_hist = step
        if heat:
            self._last_heat = step
        if self.rank0:
            self._scalars_out().write_events([(t, v, step) for t, v in scalars.items()])
            if sums:
                self._write_detail(step, sums, hist=hist, heat=heat)
        return scalars

    def _router_health(self, step: int, sums: dict[SubLayer, LoadSums],
                       units: dict[SubLayer, RouterUnitSums]) -> dict[str, float]:
        """Per sub-layer: dead router hidden units, pre-activation mean and positive fraction, H(m|x)/log E,
        and after the warm-up the near-uniform flag; warns once per sub-layer (rank 0) when a router is
        near uniform or has too many dead units. Values are already reduced, so every rank agrees."""
        cfg = self.config
        out: dict[str, float] = {}
        checking = step >= cfg.router_warmup_steps
        for sub, s in sums.items():
            if sub in units:
                for stat, v in router_unit_stats(units[sub]).items():
                    out[tags.stat_tag(sub, stat)] = v
            h_rel = relative_entropy(load_stats(s)["H_m_given_x"], s.num_experts)
            out[tags.stat_tag(sub, "H_m_given_x_rel")] = h_rel
            if not checking or not math.isfinite(h_rel):
                continue
            near = h_rel >= 1.0 - cfg.router_uniform_tol
            out[tags.stat_tag(sub, "router_near_uniform")] = float(near)
            if near and self.rank0:
                warn_once(f"monitor: the {sub.tag} router is near uniform after {cfg.router_warmup_steps} steps "
                          f"(H(m|x) >= {1 - cfg.router_uniform_tol:.0%} of log E): it is not learning to route; "
                          "see docs/router_learning.md")
            dead = out.get(tags.stat_tag(sub, "router_dead_units"), math.nan)
            if math.isfinite(dead) and dead >= cfg.router_dead_units_warn and self.rank0:
                warn_once(f"monitor: {sub.tag} router: at least {cfg.router_dead_units_warn:.0%} of its hidden "
                          "GELU units were never positive in a logging window after the warm-up; "
                          "see docs/router_learning.md")
        return out

    def _write_detail(self, step: int, sums: dict[SubLayer, LoadSums], *, hist: bool, heat: bool) -> None:
        cfg = self.config
        w = self._detail_writer()
        shares = {sub: s.shares() for sub, s in sums.items()}
        for sub, sh in shares.items():
            for tag, v in tags.per_expert_share_scalars(sub, sh, per_expert_max=cfg.per_expert_max, top_k=cfg.top_k).items():
                w.add_scalar(tag, v, step)
        if hist:
            for sub, sh in shares.items():
                if sums[sub].counts_E.sum() > 0:
                    w.add_histogram(tags.hist_tag(sub), sh.numpy(), step)
        if heat:
            for kind in sorted({sub.kind for sub in shares}):
                subs = sorted(s for s in shares if s.kind == kind)
                mat = share_matrix([shares[s].tolist() for s in subs])
                img = render_heatmap(mat, title=f"{kind} expert load, step {step}")
                w.add_image(tags.heatmap_tag(kind), img, step, dataformats="HWC")
            os.makedirs(self.run_dir, exist_ok=True)
            row = {"step": step, "shares": {sub.tag: [round(x, 6) for x in sh.tolist()] for sub, sh in sorted(shares.items())}}
            with open(os.path.join(self.run_dir, rundir.EXPERT_LOAD), "a") as f:
                f.write(json.dumps(row) + "\n")
        w.flush()

    def close(self) -> None:
        self.tracker.close()
        for wr in (self._writer, getattr(self._scalar_sink, "writer", None)):
            if wr is not None:
                wr.close()
        if self._ds_monitor is not None:
            tb = getattr(self._ds_monitor, "tb_monitor", None)
            if tb is not None and hasattr(tb, "flush"):
                tb.flush()
