"""molm_ds.interop.hf_config / config_from_hf: every ModelConfig survives the config.json round trip
(pruned models with uniform counts come back as the unpruned-free equivalent with real counts), and
ibm_incompatibilities names exactly what the released code cannot build."""

from __future__ import annotations

import pytest

from molm_ds.config import ModelConfig
from molm_ds.interop import config_from_hf, config_to_hf, hf_config, ibm_incompatibilities


@pytest.mark.parametrize("over", [
    {}, dict(n_head=1), dict(kv_proj=True, att_hidden=48, n_head=3), dict(stickbreaking_include_current=False),
    dict(mlp_activation="swiglu"), dict(router_type="linear"), dict(renormalize_topk=True),
    dict(routing="expert_choice", capacity_factor=1.5), dict(sample_topk=1, dropout=0.1, init_std=0.01),
    dict(layer_norm_eps=1e-6), dict(att_experts_per_layer=(4, 1), mlp_experts_per_layer=(2, 3)),
])
def test_round_trip(over):
    cfg = ModelConfig.from_preset("tiny", **over)
    assert config_from_hf(hf_config(cfg)) == cfg


def test_uniform_counts_become_the_real_counts():
    cfg = ModelConfig.from_preset("tiny", n_head=1, att_experts_per_layer=(1, 1), mlp_experts_per_layer=(3, 3))
    hf = hf_config(cfg)
    assert (hf["n_att_experts"], hf["k_att"], hf["n_mlp_experts"], hf["k_mlp"]) == (1, 1, 3, 2)
    back = config_from_hf(hf)
    assert [back.att_experts_at(i) for i in range(2)] == [1, 1] and back.k_att_at(0) == cfg.k_att_at(0) == 1
    assert back.total_params == cfg.total_params and not ibm_incompatibilities(cfg)
    assert config_to_hf(cfg)["n_att_experts"] == 1


def test_incompatibilities():
    assert not ibm_incompatibilities(ModelConfig.from_preset("molm-350m-4b"))
    assert not ibm_incompatibilities(ModelConfig.from_preset("tiny", n_head=1, routing="expert_choice"))
    tiny = ibm_incompatibilities(ModelConfig.from_preset("tiny"))
    assert len(tiny) == 1 and "kv_proj" in tiny[0]
    per_layer = ibm_incompatibilities(ModelConfig.from_preset("tiny", n_head=1, mlp_experts_per_layer=(2, 3)))
    assert len(per_layer) == 1 and "same number of MLP experts" in per_layer[0]
    assert config_to_hf(ModelConfig.from_preset("tiny", n_head=1, mlp_experts_per_layer=(2, 3)))[
        "n_mlp_experts_per_layer"] == [2, 3]  # the released layout still holds them (molm_ds reads them)
    with pytest.raises(ValueError, match="layer_norm_eps"):
        config_to_hf(ModelConfig.from_preset("tiny", n_head=1, layer_norm_eps=1e-6))


def test_released_config_defaults():
    released = dict(vocab_size=37, n_layer=2, n_embd=8, n_head=2, att_hidden=10, ffd_hidden=12, n_att_experts=4,
                    k_att=2, n_mlp_experts=6, k_mlp=2, gating_size=5, layer_norm_epsilon=1e-6)
    cfg = config_from_hf(released)
    assert cfg.kv_proj and cfg.layer_norm_eps == 1e-5  # the released code's rule and its fixed eps
