"""S1's fourth method, aux-loss-free bias balancing: its runs (own update-rate sweep, no aux loss) go through
the real trainer and measure, and the report shows it at its best rate beside none / Switch / MI."""

import json
import os

import pytest
import yaml

from experiments import s1_balance
from molm_ds.errors import ConfigError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from data_prep.embedded import build_embedded

    out = str(tmp_path_factory.mktemp("corpus") / "embedded")
    build_embedded(out, vocab_size=512, code_bytes=200_000, say=lambda _: None)
    return out


def test_bias_method_in_the_s1_grid(corpus, tmp_path):
    out = str(tmp_path / "s1")
    base = ["--out", out, "--data", corpus, "--seeds", "1", "--lrs", "1e-2", "--steps", "3", "--windows", "16"]
    assert s1_balance.main(base + ["--bias-rates", "1e-2", "--bias-lr", "1e-2", "--methods", "none,bias"]) == 0
    assert sorted(os.listdir(os.path.join(out, "runs"))) == ["bias_rate0.01_lr0.01_s1", "none_lr0.01_s1"]
    run = os.path.join(out, "runs", "bias_rate0.01_lr0.01_s1")
    job = yaml.safe_load(open(os.path.join(run, "job.yaml")))
    assert job["model"]["overrides"] == {"router_balance": "bias", "router_bias_rate": 0.01}
    assert not any(job["training"]["loss_weights"].values())
    res = json.load(open(os.path.join(run, "measure.json")))
    loss = sum(d["loss"] for d in res["domains"].values()) / 2
    md = open(os.path.join(out, "results.md")).read()
    assert f"| bias | 0.01 | 1 | {loss:.3f} ± 0.000 |" in md
    assert "best update rate 0.01" in md and "| method | rate |" in md and "| switch |" not in md
    agg = json.load(open(os.path.join(out, "results.json")))["aggregate"]
    assert agg["bias"]["best_rate"] == 0.01 and agg["bias"]["best_lr"] == 0.01
    with pytest.raises(ConfigError, match="bias-rates"):
        s1_balance.main(base + ["--bias-rates", "fast"])


def test_bias_runs_sweep_rates_over_seeds(tmp_path):
    from experiments.science import common

    s, _ = common.parse("s1_balance", "", lrs="1e-2", steps=3, argv=["--out", str(tmp_path), "--seeds", "1,2,3"],
                        extra=s1_balance.extra)
    grid = s1_balance.runs(s, 0.01, [1e-4, 1e-3], 3e-3)
    bias = [r for r in grid if r.group["method"] == "bias"]
    assert len(grid) == 3 * 3 + 2 * 3 and len(bias) == 6
    assert {(r.group["rate"], r.group["seed"], r.group["lr"]) for r in bias} == \
        {(rate, seed, 3e-3) for rate in (1e-4, 1e-3) for seed in (1, 2, 3)}
    assert len({r.name for r in grid}) == len(grid)
    only = s1_balance.runs(s, 0.01, [1e-3], 1e-2, ("none", "bias"))
    assert sorted({r.group["method"] for r in only}) == ["bias", "none"] and len(only) == 3 + 3
    with pytest.raises(ConfigError, match="--methods"):
        s1_balance.methods("none,aux")
