"""Router health in the monitor: hidden-unit sums against per-token loops, dead units, the near-uniform
flag after the warm-up, warn-once per sub-layer, and no host sync on the training path."""

import logging
import math

import pytest
import torch

from molm_ds.config import ModelConfig
from molm_ds.log import warn_once
from molm_ds.model import MoLM
from molm_ds.model.router import Router
from molm_ds.monitor import ExpertLoadTracker, MonitorConfig, SubLayer, TrainingMonitor
from molm_ds.monitor.stats import ROUTER_STAT_NAMES, RouterUnitSums, relative_entropy, router_unit_stats

from molm_ds.testing import scalars


def test_hidden_record_matches_a_loop_over_tokens_and_skips_padding():
    torch.manual_seed(0)
    r = Router(8, 5, 2, gating_size=6)
    with torch.no_grad():
        r.proj.bias[:2] = -50.0  # units 0 and 1 never turn on
    x = torch.randn(9, 8)
    mask = torch.tensor([True, True, False, True, True, True, False, True, True])
    r(x, mask)
    with torch.no_grad():
        z = x @ r.proj.weight.t() + r.proj.bias
    pos = [sum(int(z[t, u] > 0) for t in range(9) if mask[t]) for u in range(6)]
    assert r.last_hidden.positive_R.tolist() == pos
    assert float(r.last_hidden.preact_sum) == pytest.approx(sum(float(z[t].sum()) for t in range(9) if mask[t]), rel=1e-6)
    assert int(r.last_hidden.tokens) == 7
    stats = router_unit_stats(RouterUnitSums.from_record(r.last_hidden))
    assert stats["router_dead_units"] == pytest.approx(2 / 6)
    assert stats["router_preact_pos_frac"] == pytest.approx(sum(pos) / (7 * 6))
    assert stats["router_preact_mean"] == pytest.approx(float(z[mask].mean()), rel=1e-6)
    assert Router(8, 5, 2, router_type="linear").last_hidden is None


def test_unit_sums_add_and_round_trip():
    a = RouterUnitSums(torch.tensor([0.0, 3.0, 1.0], dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64),
                       torch.tensor(4.0, dtype=torch.float64))
    b = RouterUnitSums(torch.tensor([0.0, 0.0, 2.0], dtype=torch.float64), torch.tensor(-1.0, dtype=torch.float64),
                       torch.tensor(2.0, dtype=torch.float64))
    s = a + b
    assert s.positive_R.tolist() == [0.0, 3.0, 3.0] and float(s.tokens) == 6.0
    back = RouterUnitSums.unflatten(s.flatten(), 3)
    assert all(torch.equal(x, y) for x, y in zip(back.as_tuple(), s.as_tuple()))
    st = router_unit_stats(s)
    assert st == pytest.approx({"router_dead_units": 1 / 3, "router_preact_mean": 1.0 / 18, "router_preact_pos_frac": 6 / 18})
    assert all(math.isnan(v) for v in router_unit_stats(RouterUnitSums.zeros(3)).values())
    with pytest.raises(ValueError, match="3 and 2 hidden units"):
        a + RouterUnitSums.zeros(2)
    assert relative_entropy(math.log(4), 4) == pytest.approx(1.0) and math.isnan(relative_entropy(0.0, 1))


def test_tracker_accumulates_router_units_over_training_forwards_only():
    torch.manual_seed(0)
    model = MoLM(ModelConfig.from_preset("tiny")).train()
    tracker = ExpertLoadTracker(model)
    want = {}
    for _ in range(2):
        model(torch.randint(0, 512, (2, 5))).logits.sum().backward()
        for i, b in enumerate(model.blocks):
            for kind, m in (("attn", b.attn), ("mlp", b.mlpf)):
                k = SubLayer(i, kind)
                want[k] = want.get(k, 0) + m.router.last_hidden.positive_R.double()
    model.eval()
    with torch.no_grad():
        model(torch.randint(0, 512, (2, 5)))  # not counted
    load, units = tracker.reduce_with_router_units()
    assert sorted(units) == sorted(load) == tracker.sublayers
    for k, u in units.items():
        torch.testing.assert_close(u.positive_R, want[k])
        assert float(u.tokens) == 20
    plain = tracker.reduce()  # the load sums alone are unchanged by the router units riding along
    assert all(torch.equal(x, y) for k in load for x, y in zip(load[k].as_tuple(), plain[k].as_tuple()))
    linear = MoLM(ModelConfig.from_preset("tiny", router_type="linear")).train()
    t2 = ExpertLoadTracker(linear)
    linear(torch.randint(0, 512, (1, 4)))
    assert t2.reduce_with_router_units()[1] == {}


def _stuck_model():
    """Tiny model whose block-0 MLP router is exactly uniform (A = 0) with every hidden unit off
    (b = -50); every other router is far from uniform."""
    torch.manual_seed(0)
    model = MoLM(ModelConfig.from_preset("tiny")).train()
    with torch.no_grad():
        for i, b in enumerate(model.blocks):
            for m in (b.attn, b.mlpf):
                m.router.w_gate.normal_(0.0, 30.0)
        model.blocks[0].mlpf.router.w_gate.zero_()
        model.blocks[0].mlpf.router.proj.bias.fill_(-50.0)
    return model


def test_near_uniform_flag_after_warmup_and_one_warning_per_sublayer(tmp_path, caplog):
    warn_once.cache_clear()
    model = _stuck_model()
    mon = TrainingMonitor(model, config=MonitorConfig(router_warmup_steps=2), run_dir=str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="molm_ds"):
        for step in range(1, 5):
            model(torch.randint(0, 512, (2, 16))).logits.sum().backward()
            mon(step, {"loss": 1.0})
    mon.close()
    s = scalars(str(tmp_path / "tensorboard"))
    stuck = "moe/L00/mlp"
    router_tags = {t.rsplit("/", 1)[1] for t in s if t.startswith(stuck) and t.rsplit("/", 1)[1] in ROUTER_STAT_NAMES}
    assert router_tags == set(ROUTER_STAT_NAMES)
    assert sorted(s[f"{stuck}/router_near_uniform"]) == [2, 3, 4]  # written from the warm-up on
    assert set(s[f"{stuck}/router_near_uniform"].values()) == {1.0}
    assert s[f"{stuck}/H_m_given_x_rel"][1] == pytest.approx(1.0, abs=1e-6)
    assert set(s[f"{stuck}/router_dead_units"].values()) == {1.0}
    assert s[f"{stuck}/router_preact_pos_frac"][3] == 0.0 and s[f"{stuck}/router_preact_mean"][3] < -40
    for other in ("moe/L00/attn", "moe/L01/attn", "moe/L01/mlp"):
        assert set(s[f"{other}/router_near_uniform"].values()) == {0.0}
        assert s[f"{other}/H_m_given_x_rel"][4] < 0.9
        assert s[f"{other}/router_dead_units"][4] < 0.5
    uniform = [r for r in caplog.records if "near uniform" in r.getMessage()]
    dead = [r for r in caplog.records if "never positive" in r.getMessage()]
    assert len(uniform) == 1 and "L00/mlp" in uniform[0].getMessage()
    assert len(dead) == 1 and "L00/mlp" in dead[0].getMessage()


def test_router_statistics_need_no_host_sync():
    """What the monitor adds to every training forward (the router's forward with its hidden-unit record,
    the expert-load and router-unit sums the tracker accumulates) must only queue device work. On the
    meta device any read of tensor data (.item(), int(), boolean indexing, bincount) raises, so running
    the path there proves it has none. (The dispatcher's split sizes are outside this test.)"""
    from molm_ds.monitor.stats import LoadSums

    torch.manual_seed(0)
    r = Router(16, 6, 2, gating_size=8).to("meta")
    x = torch.empty(10, 16, device="meta")
    mask = torch.empty(10, dtype=torch.bool, device="meta")
    out = r(x, mask)
    load = LoadSums.from_routing(probs_TE=out.probs_TE, idx_TK=out.idx_TK, mask_T=mask, num_experts=6)
    load = load + LoadSums.from_routing(probs_TE=out.probs_TE, idx_TK=out.idx_TK, num_experts=6)
    units = RouterUnitSums.from_record(r.last_hidden) + RouterUnitSums.from_record(r.last_hidden)
    assert load.counts_E.shape == (6,) and units.positive_R.shape == (8,)
    assert all(t.device.type == "meta" for t in load.as_tuple() + units.as_tuple())


def test_a_host_sync_would_be_caught():
    """The meta-device check above can fail: reading a value is an error there."""
    with pytest.raises((NotImplementedError, RuntimeError)):
        int(torch.empty(3, dtype=torch.long, device="meta").max())
