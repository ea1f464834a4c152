"""Per-step metrics: the progress line, metrics.jsonl (rank 0) and the hook list other parts extend.

A hook is any callable ``hook(step: int, metrics: dict[str, float]) -> None``; the loop calls every
hook on every logged step with values already reduced across ranks (means over ranks and
micro-batches), on every rank (hooks that write should check the rank themselves).
"""

from __future__ import annotations

import json
import math
import os
from typing import Callable, Optional

from molm_ds.log import is_rank0

__all__ = ["MetricsWriter", "TensorBoardHook", "format_progress", "format_duration", "MetricsHook"]

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


class MetricsWriter:
    """Appends one JSON object per logged step to ``<run_dir>/metrics.jsonl`` (rank 0 only).

    On resume the file is cut back to the resumed step, so it never holds two rows for one step.
    """

    def __init__(self, path: str, *, resume_step: int = 0) -> None:
        self.path = path
        if not is_rank0():
            return
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        keep = []
        if resume_step > 0 and os.path.exists(path):
            with open(path) as f:
                keep = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= resume_step]
        with open(path, "w") as f:
            f.writelines(keep)

    def __call__(self, step: int, metrics: dict) -> None:
        if not is_rank0():
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")


class TensorBoardHook:
    """Scalars through DeepSpeed's monitor (``engine.monitor.write_events``; it writes on rank 0)."""

    def __init__(self, engine, prefix: str = "Train/") -> None:
        self.engine, self.prefix = engine, prefix

    def __call__(self, step: int, metrics: dict) -> None:
        monitor = getattr(self.engine, "monitor", None)
        if monitor is None or not getattr(monitor, "enabled", False):
            return
        events = [(self.prefix + k, float(v), step) for k, v in metrics.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None]
        monitor.write_events(events)
