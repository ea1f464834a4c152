"""TrainingMonitor in one process (no DeepSpeed monitor: the SummaryWriter fallback), read back with
TensorBoard's EventAccumulator."""

import json
import math
import os

import pytest
import torch

from molm_ds.config import ModelConfig
from molm_ds.model import MoLM
from molm_ds.monitor import MonitorConfig, ReduceOp, TrainingMonitor, load_stats
from molm_ds.monitor.stats import LoadSums

from molm_ds.testing import load_events as load
from molm_ds.testing import scalars


def run_tiny(run_dir, config, steps=3, metrics=None):
    """Train-mode forwards of the tiny model; returns the brute-force LoadSums per (step, layer, kind)."""
    torch.manual_seed(0)
    model = MoLM(ModelConfig.from_preset("tiny")).train()
    mon = TrainingMonitor(model, config=config, run_dir=str(run_dir), flops_per_token=1e6,
                          loss_scale=lambda: 1024.0)
    brute = {}
    for step in range(1, steps + 1):
        for micro in range(2):  # two micro-batches per step: both must be counted
            model(torch.randint(0, 512, (2, 7))).logits.mean().backward()
            for i, blk in enumerate(model.blocks):
                for kind, m in (("attn", blk.attn), ("mlp", blk.mlpf)):
                    r = m.last_routing
                    s = LoadSums.from_routing(probs_TE=r.probs_TE, idx_TK=r.idx_TK, num_experts=m.num_experts)
                    key = (step, i, kind)
                    brute[key] = s if micro == 0 else brute[key] + s
        m = {"loss": 3.0 + step, "lr": 0.1 * step, "tokens_per_s": 500.0, "mi": -0.5, "skipped_steps": 0}
        if step == 2:
            m["val_loss"] = 2.0
        m.update(metrics or {})
        mon(step, m)
    mon.close()
    return brute


def test_scalars_and_expert_stats(tmp_path):
    brute = run_tiny(tmp_path, MonitorConfig(histogram_every=2, heatmap_every=3, peak_flops=1e9))
    s = scalars(str(tmp_path / "tensorboard"))
    assert s["train/loss"] == {1: 4.0, 2: 5.0, 3: 6.0}
    assert s["train/aux/mi"][1] == -0.5 and s["train/loss_scale"][2] == 1024.0
    assert s["val/loss"] == {2: 2.0} and s["val/ppl"][2] == pytest.approx(math.exp(2.0), rel=1e-6)
    assert s["train/mfu"][1] == pytest.approx(500.0 * 1e6 / 1e9, rel=1e-6)
    for (step, layer, kind), sums in brute.items():
        want = load_stats(sums)
        for stat, v in want.items():
            assert s[f"moe/L{layer:02d}/{kind}/{stat}"][step] == pytest.approx(v, rel=1e-5, abs=1e-6), (stat, step)
        shares = [s[f"expert_share/L{layer:02d}/{kind}/e{e:03d}"][step] for e in range(4)]
        assert shares == pytest.approx(sums.shares().tolist(), abs=1e-6)
        assert sum(shares) == pytest.approx(1.0, abs=1e-5)


def test_histograms_heatmaps_and_jsonl_cadence(tmp_path):
    run_tiny(tmp_path, MonitorConfig(histogram_every=2, heatmap_every=3), steps=4)
    acc = load(str(tmp_path / "tensorboard" / "expert_load"))
    assert len(acc.Tags()["histograms"]) == 4  # 2 layers x (attn, mlp)
    assert [e.step for e in acc.Histograms("expert_share_hist/L01/attn")] == [2, 4]
    assert [e.step for e in acc.Images("expert_load_heatmap/mlp")] == [3]
    img = acc.Images("expert_load_heatmap/attn")[0]
    assert img.width > 50 and img.height > 50
    rows = [json.loads(line) for line in open(tmp_path / "expert_load.jsonl")]
    assert [r["step"] for r in rows] == [3]
    assert sorted(rows[0]["shares"]) == ["L00/attn", "L00/mlp", "L01/attn", "L01/mlp"]
    for sh in rows[0]["shares"].values():
        assert sum(sh) == pytest.approx(1.0, abs=1e-5)


def test_tag_count_is_bounded_beyond_per_expert_max(tmp_path):
    run_tiny(tmp_path, MonitorConfig(per_expert_max=2, top_k=1), steps=1)
    s = scalars(str(tmp_path / "tensorboard"))
    share_tags = sorted(t for t in s if t.startswith("expert_share/L00/mlp/"))
    assert share_tags == [f"expert_share/L00/mlp/{n}" for n in ("bottom1", "bottom1_id", "top1", "top1_id")]
    assert s["expert_share/L00/mlp/top1"][1] >= s["expert_share/L00/mlp/bottom1"][1]


def test_undeclared_metric_is_an_error_and_ops_declare_it(tmp_path):
    torch.manual_seed(0)
    mon = TrainingMonitor(MoLM(ModelConfig.from_preset("tiny")), run_dir=str(tmp_path))
    with pytest.raises(KeyError, match="no reduce op declared.*my_metric"):
        mon.on_step(1, {"loss": 1.0, "my_metric": 1.0})
    out = mon.on_step(1, {"my_metric": 2.0}, ops={"my_metric": ReduceOp.SUM})
    assert out["train/my_metric"] == 2.0
    mon(2, {"router_reg": 3.0, "old_val_ppl": 9.0})  # the loop's hook: already reduced, any name
    mon.close()
    s = scalars(str(tmp_path / "tensorboard"))
    assert s["train/router_reg"] == {2: 3.0} and s["val/old_ppl"] == {2: 9.0}
    assert not any(t.startswith("moe/") for t in s)  # no training forward: no empty-window NaNs


def test_disabled_writes_nothing(tmp_path):
    run_tiny(tmp_path, MonitorConfig(enabled=False), steps=1)
    assert not os.path.exists(tmp_path / "tensorboard")
