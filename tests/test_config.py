import pydantic
import pytest
import torch

from molm_ds.config import PRESETS, ModelConfig


def test_released_totals_exact():
    assert ModelConfig.from_preset("molm-350m-4b").total_params == 4_142_526_464
    assert ModelConfig.from_preset("molm-700m-8b").total_params == 8_182_046_720


def test_released_totals_by_hand():
    # per layer: 16 attention experts (W_q, W_o 1024x1024), 32 MLP experts (1024x2048 twice),
    # 2 routers (1024x256 + 256 + 256xE), 2 LayerNorms; plus wte, lm_head, ln_f.
    d, v = 1024, 50295
    router = lambda e: d * 256 + 256 + 256 * e  # noqa: E731
    layer = 16 * 2 * d * d + 32 * 2 * d * 2048 + router(16) + router(32) + 4 * d
    assert ModelConfig.from_preset("molm-350m-4b").total_params == 24 * layer + 2 * v * d + 2 * d
    active = 2 * 2 * d * d + 2 * 2 * d * 2048 + router(16) + router(32) + 4 * d
    assert ModelConfig.from_preset("molm-350m-4b").active_params == 24 * active + 2 * v * d + 2 * d


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_constructed_model_numel_equals_total(name):
    from molm_ds.model import MoLM

    cfg = ModelConfig.from_preset(name)
    assert sum(p.numel() for p in MoLM(cfg).parameters()) == cfg.total_params


def test_all_presets_valid():
    for name in PRESETS:
        cfg = ModelConfig.from_preset(name)
        assert cfg.active_params < cfg.total_params or cfg.k_mlp == cfg.n_mlp_experts
        assert cfg.flops_per_token(512) > 0


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(k_att=5, n_att_experts=4), "k_att=5 is larger than n_att_experts=4"),
        (dict(k_mlp=9), "k_mlp=9 is larger than n_mlp_experts"),
        (dict(n_head=3), "divisible by n_head"),
        (dict(att_hidden=32), "att_hidden=32|kv_proj"),
        (dict(sample_topk=3), "sample_topk"),
    ],
)
def test_bad_configs_say_what_to_change(kw, match):
    with pytest.raises(pydantic.ValidationError, match=match):
        ModelConfig.from_preset("tiny", **kw)


def test_unknown_key_and_preset():
    with pytest.raises(pydantic.ValidationError, match="extra"):
        ModelConfig(n_layers=3)
    with pytest.raises(ValueError, match="valid presets: tiny"):
        ModelConfig.from_preset("huge")
