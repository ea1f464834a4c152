"""``build_model``: the meta-device path initialises every weight once, on its device, in its dtype,
with the values of ``MoLM.reset_parameters``; the CPU default keeps the eager constructor's weights."""

from __future__ import annotations

import pytest
import torch

from molm_ds.config import ModelConfig
from molm_ds.model import MoLM, build_model
from molm_ds.model import experts as experts_mod


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture
def cfg():
    return ModelConfig.from_preset("tiny")


def test_cpu_default_keeps_the_eager_weights(cfg):
    torch.manual_seed(5)
    old = _state(MoLM(cfg))
    torch.manual_seed(5)
    new = _state(build_model(cfg))
    assert old.keys() == new.keys()
    assert all(torch.equal(old[k], new[k]) for k in old)


def test_meta_path_equals_one_reset_from_the_same_rng_state(cfg):
    eager = MoLM(cfg)
    torch.manual_seed(11)
    eager.reset_parameters()
    torch.manual_seed(11)
    built = build_model(cfg, meta=True)  # constructing on meta draws nothing
    want, got = _state(eager), _state(built)
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want), [k for k in want if not torch.equal(want[k], got[k])]
    assert all(p.device.type == "cpu" for p in built.parameters())


def test_experts_are_initialised_once(cfg, monkeypatch):
    calls = []
    real = experts_mod._init_expert_weight
    monkeypatch.setattr(experts_mod, "_init_expert_weight", lambda w: (calls.append(w.is_meta), real(w)))
    build_model(cfg, meta=True)
    n_expert_weights = 2 * 2 * cfg.n_layer  # (w_q, w_o) + (w1, w2) per layer
    assert len([c for c in calls if not c]) == n_expert_weights  # once each on real memory; the rest on meta
    calls.clear()
    MoLM(cfg)
    assert len(calls) == 2 * n_expert_weights  # the eager constructor: twice


def test_dtype_and_a_forward(cfg):
    model = build_model(cfg, dtype=torch.bfloat16, meta=True)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    out = model(torch.randint(0, cfg.vocab_size, (1, 6)))
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()
