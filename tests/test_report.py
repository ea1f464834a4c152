"""`python -m molm_ds.report RUN_DIR` renders from a tiny run: fabricated (metrics.jsonl + events written
by the monitor) and, slow, from a real tiny training job."""

import json
import math
import os
import shutil

import numpy as np
import pytest
import torch

from molm_ds import cli, report
from molm_ds.errors import DataError
from molm_ds.config import ModelConfig
from molm_ds.model import MoLM
from molm_ds.monitor import MonitorConfig, TrainingMonitor


def fabricate_run(run_dir, steps=6):
    """metrics.jsonl rows like the trainer's, plus the monitor's events and expert_load.jsonl."""
    torch.manual_seed(0)
    model = MoLM(ModelConfig.from_preset("tiny")).train()
    mon = TrainingMonitor(model, config=MonitorConfig(histogram_every=2, heatmap_every=2, peak_flops=1e9),
                          run_dir=str(run_dir), flops_per_token=1e5)
    rows = []
    for step in range(1, steps + 1):
        model(torch.randint(0, 512, (2, 6))).logits.mean().backward()
        m = {"loss": 6.0 - 0.5 * step, "lm_loss": 5.9 - 0.5 * step, "mi": -0.1, "load_concentration": 1.3,
             "switch": 1.0, "z": 0.2, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 1000.0 + step, "skipped_steps": 0}
        if step % 3 == 0:
            m["val_loss"] = 5.0 - 0.3 * step
            m["val_ppl"] = math.exp(m["val_loss"])
        mon(step, m)
        rows.append({"step": step, **m})
    mon.close()
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return rows


def check_png(path):
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    img = matplotlib.image.imread(path)
    assert img.shape[0] > 400 and img.shape[1] > 400 and float(np.std(img)) > 0.01  # not blank


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    fabricate_run(d)
    return d


def test_load_run_reads_every_source(run_dir):
    data = report.load_run(str(run_dir))
    assert data.series["loss"] == ([1, 2, 3, 4, 5, 6], [5.5, 5.0, 4.5, 4.0, 3.5, 3.0])
    assert data.series["val_ppl"][0] == [3, 6]
    assert data.series["mfu"][1][0] == pytest.approx(1001.0 * 1e5 / 1e9, rel=1e-5)  # only in the events
    assert set(data.load) == {"attn", "mlp"}
    steps, rows, mat = data.load["mlp"]
    assert steps == [1, 2, 3, 4, 5, 6]  # per-expert scalars (every step) beat expert_load.jsonl (every 2nd)
    assert rows == [(l, e) for l in range(2) for e in range(4)]
    for j in range(len(steps)):
        for l in range(2):
            assert mat[4 * l : 4 * l + 4, j].sum() == pytest.approx(1.0, abs=1e-5)


def test_cli_writes_png_and_html(run_dir, tmp_path):
    out = tmp_path / "out"
    assert report.main([str(run_dir), "--out", str(out)]) == 0
    check_png(out / "report.png")
    page = (out / "report.html").read_text()
    assert '<img src="report.png"' in page and "final validation perplexity" in page
    assert f"{math.exp(5.0 - 1.8):.2f}" in page


def test_events_alone_and_jsonl_alone(run_dir, tmp_path):
    only_events = tmp_path / "events"
    shutil.copytree(run_dir, only_events)
    os.remove(only_events / "metrics.jsonl")
    os.remove(only_events / "expert_load.jsonl")
    data = report.load_run(str(only_events))
    assert data.series["loss"][1] == pytest.approx([5.5, 5.0, 4.5, 4.0, 3.5, 3.0])  # train/loss tags
    assert data.series["val_loss"][0] == [3, 6] and "mi" in data.series
    assert set(data.load) == {"attn", "mlp"}
    report.main([str(only_events)])
    check_png(only_events / "report.png")

    only_jsonl = tmp_path / "jsonl"
    only_jsonl.mkdir()
    shutil.copy(run_dir / "metrics.jsonl", only_jsonl)
    shutil.copy(run_dir / "expert_load.jsonl", only_jsonl)
    data = report.load_run(str(only_jsonl))
    assert data.load["attn"][0] == [2, 4, 6]
    report.main([str(only_jsonl)])
    check_png(only_jsonl / "report.png")


def test_empty_or_missing_run_dir_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(DataError, match="nothing to report"):
        report.load_run(str(tmp_path))
    with pytest.raises(DataError, match="does not exist"):
        report.load_run(str(tmp_path / "nope"))
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2}\nnot json\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2"):
        report.load_run(str(tmp_path))
    with pytest.raises(SystemExit) as e:  # the command: one error line, exit 2
        cli.run(report.main, [str(tmp_path / "nope")])
    assert e.value.code == 2 and capsys.readouterr().err.startswith("error: run directory")


def test_aux_terms_get_one_axis_each(tmp_path):
    """z-loss ~110 beside MI ~ -1.3: each term on its own y-axis, so MI's axis spans MI's range, not z's."""
    steps = list(range(1, 31))
    data = report.RunData(series={
        "loss": (steps, [5.0 - 0.05 * s for s in steps]),
        "mi": (steps, [-1.2 - 0.01 * s for s in steps]),
        "switch": (steps, [1.0 + 0.001 * s for s in steps]),
        "z": (steps, [110.0 - 0.5 * s for s in steps]),
    })
    fig = report.render_report(data, str(tmp_path / "r.png"))
    assert (tmp_path / "r.png").stat().st_size > 0
    axes = {a.get_ylabel(): a for a in fig.axes if a.get_ylabel() in report.AUX_NAMES}
    assert set(axes) == {"mi", "switch", "z"}
    for name, ax in axes.items():
        lo, hi = ax.get_ylim()
        values = data.series[name][1]
        assert lo <= min(values) and max(values) <= hi, name
        assert hi - lo < 2 * (max(values) - min(values)) + 1e-9, (name, lo, hi)  # filled by its own data
    # one term alone keeps the single panel
    alone = report.render_report(report.RunData(series={"mi": (steps, data.series["mi"][1])}), str(tmp_path / "a.png"))
    assert [a.get_title() for a in alone.axes].count("aux terms") == 1
