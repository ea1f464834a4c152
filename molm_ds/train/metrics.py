"""Per-step metrics: the progress line, metrics.jsonl (rank 0), TensorBoard and the hook list.

A hook is any callable ``hook(step: int, metrics: dict[str, float]) -> None``; ``StepLog`` calls every
hook on every logged step with values already reduced across ranks (means over ranks and
micro-batches), on every rank (hooks that write check the rank themselves; the TensorBoard monitor
runs collectives, so every rank must call it at the same steps). Values are read from the device
only on logged steps: that is where the step's host syncs are.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Callable, Optional

from molm_ds import rundir
from molm_ds.log import is_rank0
from molm_ds.monitor.balance import balance_metrics
from molm_ds.storage import atomic_write_text, guarded_write

__all__ = ["MetricsWriter", "StepLog", "format_progress", "format_duration", "MetricsHook"]

MetricsHook = Callable[[int, dict], None]


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def _num(x: Optional[float], fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def format_progress(step: int, total: int, m: dict, eta_s: float) -> str:
    """``step 10/200 | loss 5.1234 (lm 5.1100) | lr 3.00e-04 | gnorm 1.23 | 12,345 tok/s | ETA 1m23s``"""
    parts = [f"step {step}/{total}", f"loss {_num(m.get('loss'), '.4f')} (lm {_num(m.get('lm_loss'), '.4f')})",
             f"lr {_num(m.get('lr'), '.2e')}", f"gnorm {_num(m.get('grad_norm'), '.3f')}",
             f"{_num(m.get('tokens_per_s'), ',.0f')} tok/s"]
    if m.get("val_loss") is not None:
        parts.append(f"val {m['val_loss']:.4f} (ppl {m['val_ppl']:.2f})")
    if m.get("skipped_steps"):
        parts.append(f"skipped {m['skipped_steps']}")
    parts.append(f"ETA {format_duration(eta_s)}")
    return " | ".join(parts)


def _step_of(line: str) -> int:
    """The step of a metrics row; a row cut short by a crash or a full disk (not JSON) counts as past every step."""
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 1 << 62


class MetricsWriter:
    """Appends one JSON object per logged step to ``<run_dir>/metrics.jsonl`` (rank 0 only).

    On resume the file is cut back to the resumed step, so it never holds two rows for one step (a last row
    cut short by a crash or a full disk goes too). A refused write is a ``molm_ds.storage.StorageError``.
    """

    def __init__(self, path: str, *, resume_step: int = 0) -> None:
        self.path = path
        if not is_rank0():
            return
        keep = []
        if resume_step > 0 and os.path.exists(path):
            with open(path) as f:
                keep = [line for line in f if line.strip() and _step_of(line) <= resume_step]
        with guarded_write("metrics", path):
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        atomic_write_text(path, "".join(keep), what="metrics")

    def __call__(self, step: int, metrics: dict) -> None:
        if not is_rank0():
            return
        line = json.dumps({"step": step, **metrics}) + "\n"
        with guarded_write("a metrics row to", self.path, need=len(line)):
            with open(self.path, "a") as f:
                f.write(line)
                f.flush()


def _grad_norm(engine) -> Optional[float]:
    g = engine.get_global_grad_norm()
    if g is None:
        return None
    g = float(g.item() if hasattr(g, "item") else g)  # host sync: logged steps only
    return g if math.isfinite(g) else None


class StepLog:
    """Everything the loop reports at a logged step: metrics.jsonl, TensorBoard (expert load through
    ``molm_ds.monitor``), the caller's hooks and the progress line."""

    def __init__(self, job, engine, hooks, *, resume_step: int, world: int) -> None:
        from molm_ds.monitor import TrainingMonitor

        self.job, self.engine, self.world = job, engine, world
        self.metrics_path = os.path.join(job.run_dir, rundir.METRICS)
        self.monitor = TrainingMonitor.for_engine(
            engine, config=job.monitor.expert_load, run_dir=job.run_dir, tensorboard_dir=job.tensorboard_dir,
            flops_per_token=job.build_model_config().flops_per_token(job.data.seq_len)) if job.monitor.tensorboard else None
        self.hooks = [MetricsWriter(self.metrics_path, resume_step=resume_step), *([self.monitor] if self.monitor else []),
                      *hooks]
        t = job.training
        self.tokens_per_step = t.micro_batch_size * t.grad_accum_steps * world * job.data.seq_len
        self.first_step, self.last_logged = resume_step, resume_step
        self.t_start = self.t_last = time.time()
        self.last: dict = {}

    def banner(self, step: int) -> str:
        cfg, t = self.job.build_model_config(), self.job.training
        stage = self.engine.zero_optimization_stage() if self.engine.zero_optimization() else 0
        return (f"training {cfg.total_params:,} parameters ({cfg.active_params:,} active) on {self.world} rank(s), "
                f"ep_size {self.job.parallel.ep_size}, ZeRO-{stage}, {self.tokens_per_step:,} tokens/step, "
                f"steps {step + 1}..{t.steps}")

    def write(self, step: int, metrics: dict) -> None:
        """Hand a row to every hook (every rank), skipping empty rows and None values."""
        row = {k: v for k, v in metrics.items() if v is not None}
        if row:
            for hook in self.hooks:
                if hook is self.monitor:
                    with guarded_write("TensorBoard events in", self.job.tensorboard_dir):
                        hook(step, row)
                else:
                    hook(step, row)

    def due(self, step: int) -> bool:
        return step % self.job.monitor.log_interval == 0 or step in (1, self.job.training.steps)

    def step(self, state, sums, reduced, *, lr: float, extra: dict) -> None:
        """After optimizer step ``state.step``: on logged steps (and any step with ``extra`` metrics, such
        as an evaluation) read the reduced sums, then write the row."""
        step = state.step
        if not (self.due(step) or extra):
            return
        from molm_ds.log import info0

        now = time.time()
        applied = state.nonfinite_in_a_row == 0
        values = sums.to_metrics(reduced)  # host sync
        values.pop("nonfinite")
        m = {k: (v if applied else None) for k, v in values.items()}
        window = max(1, step - self.last_logged)
        m.update(lr=lr, grad_norm=_grad_norm(self.engine) if applied else None,
                 tokens_per_s=self.tokens_per_step * window / max(now - self.t_last, 1e-9),
                 skipped_steps=state.skipped_steps,
                 **balance_metrics(self.engine.module, per_expert_max=self.job.monitor.expert_load.per_expert_max),
                 **extra)
        self.last_logged, self.t_last = step, now
        done = step - self.first_step
        eta = (now - self.t_start) / max(done, 1) * (self.job.training.steps - step)
        info0(format_progress(step, self.job.training.steps, m, eta))
        self.write(step, m)
        self.last = m

    def close(self) -> None:
        if self.monitor is not None:
            with guarded_write("TensorBoard events in", self.job.tensorboard_dir):
                self.monitor.close()
