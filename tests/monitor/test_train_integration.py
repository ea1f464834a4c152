"""A real tiny training job (molm_ds.train, one gloo rank, DeepSpeed engine and monitor) with the
monitor wired in: tags on one step axis, shares summing to 1, and the report renders from the run."""

import json
import math
import os

import pytest

from molm_ds import report
from molm_ds.train import load_job, loop
from molm_ds.testing import TINY_JOB, tiny_job_overrides, write_shard

from molm_ds.testing import load_events as load
from molm_ds.testing import scalars

pytestmark = pytest.mark.slow


def test_tiny_job_writes_monitoring_and_report(tmp_path):
    shard = write_shard(tmp_path / "data")
    run_dir = tmp_path / "run"
    job = load_job(TINY_JOB, tiny_job_overrides(shard, run_dir) + [
        "training.steps=4", "checkpoint.interval=0", "checkpoint.save_final=false", "monitor.log_interval=2",
        "monitor.expert_load.heatmap_every=2", "monitor.expert_load.histogram_every=2",
        "monitor.expert_load.peak_flops=1e12"])
    loop.train(job)
    rows = {r["step"]: r for r in map(json.loads, open(run_dir / "metrics.jsonl"))}
    tb = os.path.join(str(run_dir), "tensorboard")
    s = scalars(tb)
    logged = sorted(rows)
    assert s["train/loss"] == pytest.approx({k: rows[k]["loss"] for k in logged}, rel=1e-6)
    assert sorted(s["train/aux/mi"]) == logged and sorted(s["train/mfu"]) == logged
    layers = job.build_model_config().n_layer
    for layer in range(layers):
        for kind in ("attn", "mlp"):
            assert sorted(s[f"moe/L{layer:02d}/{kind}/H_m"]) == logged
            for step in logged:
                shares = [v[step] for t, v in s.items() if t.startswith(f"expert_share/L{layer:02d}/{kind}/e")]
                assert shares and sum(shares) == pytest.approx(1.0, abs=1e-5)
                mi = s[f"moe/L{layer:02d}/{kind}/mi"][step]
                assert 0.0 <= mi <= math.log(len(shares)) + 1e-6
    detail = [d for d, _, fs in os.walk(tb) if d.endswith("expert_load") and fs]
    assert len(detail) == 1 and load(detail[0]).Tags()["images"]
    assert report.main([str(run_dir)]) == 0
    assert os.path.getsize(run_dir / "report.png") > 10_000 and (run_dir / "report.html").exists()
