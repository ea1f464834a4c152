"""molm_ds.monitor.balance: per-expert bias and per-sub-layer load of aux-loss-free balancing, read from the
routers, bounded tag count, nothing for models without a bias; the report draws them."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from molm_ds.config import ModelConfig
from molm_ds.model import MoLM
from molm_ds.monitor.balance import balance_metrics
from molm_ds.train.balance import update_router_biases


def test_values_follow_the_routers():
    assert balance_metrics(MoLM(ModelConfig.from_preset("tiny"))) == {}
    torch.manual_seed(0)
    m = MoLM(ModelConfig.from_preset("tiny", router_balance="bias", router_bias_rate=0.25)).train()
    m(torch.randint(0, 512, (2, 8)))
    update_router_biases(m)
    r = m.blocks[1].mlpf.router
    got = balance_metrics(m)
    assert [got[f"balance/L01/mlp/bias/e{e:03d}"] for e in range(4)] == r.expert_bias_E.tolist()
    assert got["balance/L01/mlp/bias_spread"] == max(r.expert_bias_E.tolist()) - min(r.expert_bias_E.tolist())
    load = r.last_step_load_E.double()
    assert int(load.sum()) == 16 * 2  # every token, k = 2
    assert got["balance/L01/mlp/load_max_mean"] == pytest.approx(float(load.max() / load.mean()))
    assert got["balance/L01/mlp/load_cv"] == pytest.approx(float(load.std(unbiased=False) / load.mean()))
    small = balance_metrics(m, per_expert_max=2)
    assert not any("/bias/e" in k for k in small) and "balance/L00/attn/bias_max" in small


def test_report_draws_the_balance_panel(tmp_path):
    from molm_ds import report

    rows = [{"step": s, "loss": 5.0 - 0.1 * s, "balance/L00/mlp/bias_spread": 0.01 * s,
             "balance/L00/mlp/load_max_mean": 2.0 - 0.1 * s, "balance/L01/attn/bias_spread": 0.02 * s,
             "balance/L01/attn/load_max_mean": 1.5} for s in range(1, 6)]
    with open(os.path.join(tmp_path, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    data = report.load_run(str(tmp_path))
    assert data.series["balance/L01/attn/bias_spread"][1][-1] == pytest.approx(0.1)
    report.render_report(data, str(tmp_path / "r.png"))
    import matplotlib.image

    assert matplotlib.image.imread(str(tmp_path / "r.png")).shape[0] > 400
    assert math.isfinite(data.series["balance/L00/mlp/load_max_mean"][1][0])
