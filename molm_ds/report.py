"""Run report: `python -m molm_ds.report RUN_DIR` writes RUN_DIR/report.png and RUN_DIR/report.html.

Panels: training loss curves (loss, lm_loss, val_loss), aux terms, validation perplexity, throughput
(tokens/s, MFU when logged) and, per sub-layer kind (attention / MLP), the expert-load heatmap over
time (rows = layer x expert, columns = steps, colour = share x E, so 1 = uniform load) and, for runs with
aux-loss-free balancing (``router_balance: bias``), the bias spread and the load max/mean of every sub-layer.

Sources, first found wins per series: <RUN_DIR>/metrics.jsonl (the trainer's rows), the TensorBoard
event files under RUN_DIR (or --tensorboard DIR; tags written by molm_ds.monitor), and
<RUN_DIR>/expert_load.jsonl (full share matrices) or else the per-expert `expert_share/...` scalars.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
from dataclasses import dataclass, field

import numpy as np

from molm_ds import cli, rundir
from molm_ds.errors import DataError

__all__ = ["RunData", "load_run", "render_report", "main"]

Series = tuple[list[int], list[float]]  # (steps, values), sorted by step

_SHARE_TAG = re.compile(r"^expert_share/L(\d+)/(\w+)/e(\d+)$")
_SUB_KEY = re.compile(r"^L(\d+)/(\w+)$")
_BALANCE = re.compile(r"^balance/(L\d+/\w+)/bias_spread$")


@dataclass
class RunData:
    series: dict[str, Series] = field(default_factory=dict)  # loss, lm_loss, val_loss, tokens_per_s, mfu, ...
    # kind -> (steps [S], row labels [(layer, expert)], shares [rows, S])
    load: dict[str, tuple[list[int], list[tuple[int, int]], np.ndarray]] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)


def _sorted_series(points: dict[int, float]) -> Series:
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def _read_jsonl(path: str) -> list[dict]:
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: not a JSON line ({e}); fix or remove that line") from None
    return rows


def _event_scalars(root: str) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, dict[int, float]] = {}
    dirs = sorted({d for d, _, fs in os.walk(root) if any(f.startswith("events.out.tfevents") for f in fs)})
    for d in dirs:
        acc = EventAccumulator(d, size_guidance={"scalars": 0, "histograms": 1, "images": 1, "tensors": 1})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, {}).update({e.step: float(e.value) for e in acc.Scalars(tag)})
    return out


def _series_name(tag: str):
    """Event tag -> series name: train/loss -> loss, train/aux/mi -> mi, val/loss -> val_loss."""
    if tag.startswith("train/"):
        return tag[len("train/"):].replace("aux/", "")
    if tag.startswith("val/"):
        return "val_" + tag[len("val/"):]
    return None


def _load_from_rows(rows: list[dict]):
    by_kind: dict[str, dict[int, dict[int, list[float]]]] = {}  # kind -> step -> layer -> shares
    for r in rows:
        for key, shares in r["shares"].items():
            m = _SUB_KEY.match(key)
            if m:
                by_kind.setdefault(m.group(2), {}).setdefault(int(r["step"]), {})[int(m.group(1))] = shares
    return by_kind


def _load_from_tags(scalars: dict[str, dict[int, float]]):
    by_kind: dict[str, dict[int, dict[int, dict[int, float]]]] = {}
    for tag, pts in scalars.items():
        m = _SHARE_TAG.match(tag)
        if m:
            layer, kind, e = int(m.group(1)), m.group(2), int(m.group(3))
            for step, v in pts.items():
                by_kind.setdefault(kind, {}).setdefault(step, {}).setdefault(layer, {})[e] = v
    return {k: {s: {l: [d[e] for e in sorted(d)] for l, d in layers.items()} for s, layers in steps.items()}
            for k, steps in by_kind.items()}


def _load_matrix(per_step: dict[int, dict[int, list[float]]]):
    steps = sorted(per_step)
    layers = sorted({l for s in steps for l in per_step[s]})
    width = {l: max(len(per_step[s].get(l, [])) for s in steps) for l in layers}
    rows = [(l, e) for l in layers for e in range(width[l])]
    mat = np.full((len(rows), len(steps)), np.nan)
    for j, s in enumerate(steps):
        i = 0
        for l in layers:
            sh = per_step[s].get(l)
            if sh is not None:
                mat[i : i + len(sh), j] = sh
            i += width[l]
    return steps, rows, mat


def load_run(run_dir: str, tensorboard_dir: str | None = None) -> RunData:
    """Everything the report draws, from whatever the run left behind."""
    if not os.path.isdir(run_dir):
        raise DataError(f"run directory {run_dir!r} does not exist: give the job's run_dir (e.g. runs/demo)")
    data = RunData()
    points: dict[str, dict[int, float]] = {}
    metrics = os.path.join(run_dir, rundir.METRICS)
    if os.path.exists(metrics):
        data.sources.append(metrics)
        for r in _read_jsonl(metrics):
            for k, v in r.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    points.setdefault(k, {})[int(r["step"])] = float(v)
    tb_root = tensorboard_dir or run_dir
    scalars = _event_scalars(tb_root) if os.path.isdir(tb_root) else {}
    if scalars:
        data.sources.append(f"event files under {tb_root}")
    for tag, pts in scalars.items():
        name = _series_name(tag)
        if name is not None and name not in points:  # metrics.jsonl wins (float64, every logged step)
            points[name] = pts
    if "val_loss" in points and "val_ppl" not in points:
        points["val_ppl"] = {s: math.exp(min(v, 50.0)) for s, v in points["val_loss"].items()}
    data.series = {k: _sorted_series(v) for k, v in points.items() if v}

    # Expert load: the full matrices of expert_load.jsonl (heatmap steps) or the per-expert share scalars
    # (every logged step, when the sub-layers are small enough to have them): whichever has more steps.
    load_path = os.path.join(run_dir, rundir.EXPERT_LOAD)
    from_rows = _load_from_rows(_read_jsonl(load_path)) if os.path.exists(load_path) else {}
    from_tags = _load_from_tags(scalars)
    n_steps = lambda d: sum(len(v) for v in d.values())  # noqa: E731
    by_kind = from_rows if n_steps(from_rows) >= n_steps(from_tags) else from_tags
    if by_kind is from_rows and from_rows:
        data.sources.append(load_path)
    data.load = {kind: _load_matrix(per_step) for kind, per_step in sorted(by_kind.items()) if per_step}
    if not data.series and not data.load:
        raise DataError(
            f"nothing to report in {run_dir!r}: no metrics.jsonl, no TensorBoard event files, no expert_load.jsonl "
            "(pass the run_dir of a training job, or --tensorboard DIR when the events live elsewhere)"
        )
    return data


AUX_NAMES = ("mi", "load_concentration", "switch", "z")


def _plot_lines(ax, data: RunData, names, title, ylabel, log=False):
    drawn = False
    for n in names:
        if n in data.series:
            s, v = data.series[n]
            ax.plot(s, v, marker="o" if len(s) < 20 else None, ms=3, label=n)
            drawn = True
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if drawn:
        ax.legend(fontsize=8)
        if log:
            ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")
    ax.grid(alpha=0.3)


def _plot_aux(fig, ax, data: RunData) -> None:
    """The aux-loss terms, one y-axis each (stacked, shared step axis): their scales differ by orders of
    magnitude (router z-loss ~100, MI ~ -log N) and MI is negative, so neither one axis nor a log scale
    shows them all."""
    names = [n for n in AUX_NAMES if n in data.series]
    if len(names) < 2:
        _plot_lines(ax, data, AUX_NAMES, "aux terms", "value")
        return
    sub = ax.get_subplotspec().subgridspec(len(names), 1, hspace=0.08)
    ax.remove()
    first = None
    for i, n in enumerate(names):
        a = fig.add_subplot(sub[i], sharex=first)
        first = first or a
        s, v = data.series[n]
        a.plot(s, v, marker="o" if len(s) < 20 else None, ms=3, color=f"C{i}")
        a.set_ylabel(n, fontsize=8)
        a.tick_params(labelsize=7)
        a.grid(alpha=0.3)
        if i == 0:
            a.set_title("aux terms (one axis each)")
        if i < len(names) - 1:
            a.tick_params(labelbottom=False)
        else:
            a.set_xlabel("step")


def render_report(data: RunData, png_path: str, *, title: str = ""):
    """Draw the report into ``png_path``; returns the matplotlib Figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    kinds = list(data.load) or ["attn", "mlp"]
    balance = sorted(n for n in data.series if _BALANCE.match(n))
    n_rows = 2 + (len(kinds) + 1) // 2 + (1 if balance else 0)
    fig = Figure(figsize=(14, 4 * n_rows), dpi=90)
    FigureCanvasAgg(fig)
    axes = fig.subplots(n_rows, 2, squeeze=False)
    _plot_lines(axes[0][0], data, ("loss", "lm_loss", "val_loss"), "loss", "nats / token")
    _plot_aux(fig, axes[0][1], data)
    _plot_lines(axes[1][0], data, ("val_ppl",), "validation perplexity", "perplexity", log=True)
    ax = axes[1][1]
    _plot_lines(ax, data, ("tokens_per_s",), "throughput", "tokens / s")
    if "mfu" in data.series:
        ax2 = ax.twinx()
        s, v = data.series["mfu"]
        ax2.plot(s, [100 * x for x in v], color="tab:red", ls="--", label="MFU")
        ax2.set_ylabel("MFU (%)", color="tab:red")
    for i, kind in enumerate(kinds):
        ax = axes[2 + i // 2][i % 2]
        if kind not in data.load:
            ax.text(0.5, 0.5, "no expert-load data", ha="center", va="center", transform=ax.transAxes, color="gray")
            ax.set_title(f"{kind} expert load over time")
            continue
        steps, rows, mat = data.load[kind]
        widths: dict[int, int] = {}
        for layer, _ in rows:
            widths[layer] = widths.get(layer, 0) + 1
        rel = mat * np.array([widths[l] for l, _ in rows])[:, None]  # share x E: 1 = uniform
        finite = rel[np.isfinite(rel)]
        im = ax.imshow(rel, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0.0,
                       vmax=max(2.0, float(finite.max()) if finite.size else 2.0),
                       extent=(-0.5, len(steps) - 0.5, len(rows) - 0.5, -0.5))
        fig.colorbar(im, ax=ax, label="load / uniform")
        starts = [i for i, (l, e) in enumerate(rows) if e == 0]
        for y in starts[1:]:
            ax.axhline(y - 0.5, color="white", lw=0.6)
        ax.set_yticks(starts)
        ax.set_yticklabels([f"L{rows[i][0]}" for i in starts], fontsize=7)
        ticks = np.unique(np.linspace(0, len(steps) - 1, min(len(steps), 8)).astype(int))
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(steps[t]) for t in ticks])
        ax.set_xlabel("step")
        ax.set_ylabel("layer / expert")
        ax.set_title(f"{kind} expert load over time")
    for j in range(len(kinds), 2 * ((len(kinds) + 1) // 2)):
        axes[2 + j // 2][j % 2].axis("off")
    if balance:
        subs = [_BALANCE.match(n).group(1) for n in balance]
        _plot_lines(axes[-1][0], data, [f"balance/{s}/bias_spread" for s in subs],
                    "balancing bias: max - min per sub-layer", "bias spread")
        _plot_lines(axes[-1][1], data, [f"balance/{s}/load_max_mean" for s in subs],
                    "load the bias produced: max / mean per sub-layer", "max / mean (1 = balanced)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png_path)
    return fig


def _summary(data: RunData) -> list[tuple[str, str]]:
    out = []
    for name, label, fmt in (("loss", "final loss", ".4f"), ("lm_loss", "final LM loss", ".4f"),
                             ("val_loss", "final validation loss", ".4f"), ("val_ppl", "final validation perplexity", ".2f")):
        if name in data.series:
            s, v = data.series[name]
            out.append((label, f"{v[-1]:{fmt}} (step {s[-1]})"))
    if "tokens_per_s" in data.series:
        v = data.series["tokens_per_s"][1]
        out.append(("median throughput", f"{float(np.median(v)):,.0f} tokens/s"))
    if "mfu" in data.series:
        out.append(("median MFU", f"{100 * float(np.median(data.series['mfu'][1])):.2f} %"))
    for kind, (steps, rows, mat) in data.load.items():
        last = mat[:, -1]
        dead = int(np.sum(last[np.isfinite(last)] == 0))
        out.append((f"{kind} experts dead at step {steps[-1]}", f"{dead} of {len(rows)}"))
    return out


def write_html(data: RunData, html_path: str, png_name: str, *, title: str) -> None:
    rows = "\n".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in _summary(data))
    srcs = "\n".join(f"<li><code>{html.escape(s)}</code></li>" for s in data.sources)
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}}th{{text-align:left;padding-right:1em}}img{{max-width:100%}}</style>
</head><body>
<h1>{html.escape(title)}</h1>
<table>
{rows}
</table>
<p><img src="{html.escape(png_name)}" alt="loss, perplexity, throughput and expert-load heatmaps"></p>
<p>Sources:</p><ul>
{srcs}
</ul>
</body></html>
"""
    with open(html_path, "w") as f:
        f.write(page)


def main(argv=None) -> int:
    p = cli.ArgumentParser(prog="python -m molm_ds.report", description=__doc__.splitlines()[0])
    p.add_argument("run_dir", help="the job's run_dir (holds metrics.jsonl, tensorboard/, expert_load.jsonl)")
    p.add_argument("--tensorboard", default=None, help="event-file directory when it is not under run_dir")
    p.add_argument("--out", default=None, help="output directory (default: run_dir)")
    a = p.parse_args(argv)
    data = load_run(a.run_dir, a.tensorboard)
    out = a.out or a.run_dir
    os.makedirs(out, exist_ok=True)
    title = f"molm-ds run {os.path.basename(os.path.abspath(a.run_dir))}"
    png = os.path.join(out, rundir.REPORT_PNG)
    render_report(data, png, title=title)
    write_html(data, os.path.join(out, rundir.REPORT_HTML), rundir.REPORT_PNG, title=title)
    print(f"wrote {png} and {os.path.join(out, rundir.REPORT_HTML)}")
    return 0


if __name__ == "__main__":
    cli.run(main)
