"""Expert insertion on a plain model: old weights kept bit for bit, new ones freshly initialised, routing
over E + N experts, a model grown by 0 experts unchanged."""

import pytest
import torch

from molm_ds.config import ModelConfig
from molm_ds.continual import grow_experts, new_expert_counts
from molm_ds.model import MoLM


def tiny(**kw):
    torch.manual_seed(0)
    return MoLM(ModelConfig.from_preset("tiny", **kw))


def test_old_weights_kept_and_shapes_grow():
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grow_experts(model, attention=1, mlp=3, seed=5)
    assert model.config.n_att_experts == 5 and model.config.n_mlp_experts == 7
    assert model.config == ModelConfig.from_preset("tiny").grown(attention=1, mlp=3)
    sd = model.state_dict()
    assert set(sd) == set(before)
    for k, old in before.items():
        new = sd[k]
        if new.shape == old.shape:
            assert torch.equal(new, old), k
        else:  # stacked experts or router A: old rows first, bit for bit
            assert torch.equal(new[: old.shape[0]], old), k
            grow = 1 if ".attn." in k else 3
            assert new.shape[0] == old.shape[0] + grow and new.shape[1:] == old.shape[1:], k
            fresh = new[old.shape[0]:]
            if "w_gate" in k:  # as the model's router_init (tiny: fan_in) draws A: N(0, 1/gating_size)
                want = old.shape[1] ** -0.5
                assert 0.5 * want < float(fresh.std()) < 2 * want
            else:  # U(-1/fan_in, 1/fan_in)
                assert fresh.abs().max() <= 1.0 / old.shape[1] and fresh.abs().max() > 0.5 / old.shape[1]
    for layer in model.moe_layers():
        assert layer.router.num_experts == layer.num_experts == layer.dispatcher.num_experts == layer.experts.num_experts
    assert set(new_expert_counts(model).values()) == {(4, 5), (4, 7)}


def test_grown_model_routes_to_new_experts_and_trains():
    model = grow_experts(tiny(), attention=2, mlp=2, seed=1)
    x = torch.randint(0, 512, (2, 16))
    out = model(x)
    loss = out.logits.logsumexp(-1).mean()
    loss.backward()
    for layer in model.moe_layers():
        assert layer.last_routing.probs_TE.shape[-1] == 6
        assert layer.experts.parameters().__next__().grad is not None
    # the new experts are used by some tokens (gates from the full softmax over 6)
    used = torch.cat([layer.last_routing.idx_TK.flatten() for layer in model.moe_layers()])
    assert (used >= 4).any()


def test_zero_new_experts_is_the_identity_and_seed_is_deterministic():
    x = torch.randint(0, 512, (2, 12))
    a, b = tiny(), tiny()
    ref = a(x).logits
    grow_experts(a, attention=0, mlp=0, seed=3)
    assert torch.equal(a(x).logits, ref)
    grow_experts(b, attention=2, mlp=2, seed=3)
    c = grow_experts(tiny(), attention=2, mlp=2, seed=3)
    for (k, v), (k2, v2) in zip(b.state_dict().items(), c.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


def test_bad_counts_and_parallel_models_are_refused():
    with pytest.raises(ValueError, match="must be >= 0"):
        grow_experts(tiny(), attention=-1, mlp=2, seed=0)
    m = tiny()
    m._molm_expert_parallel = object()
    with pytest.raises(ValueError, match="before parallelize"):
        grow_experts(m, attention=1, mlp=1, seed=0)


@pytest.mark.parametrize("scheme", ["fan_in", "released"])
def test_new_router_rows_get_the_models_router_init(scheme):
    """New module embeddings A' are drawn as Router.reset_parameters draws A under config.router_init."""
    cfg = ModelConfig.from_preset("tiny", gating_size=256, router_init=scheme)
    torch.manual_seed(0)
    model = MoLM(cfg)
    grow_experts(model, attention=16, mlp=16, seed=3)
    want = 256 ** -0.5 if scheme == "fan_in" else cfg.init_std
    for layer in model.moe_layers():
        new = layer.router.w_gate[layer.continual_old_experts:]
        assert new.shape[0] == 16
        assert abs(float(new.std()) / want - 1) < 0.1, (scheme, float(new.std()), want)


def test_released_presets_keep_the_released_router_init():
    from molm_ds.config import PRESETS

    for name in PRESETS:
        want = "released" if name.startswith("molm-") else "fan_in"
        assert ModelConfig.from_preset(name).router_init == want, name


def test_surgery_needs_no_trainer():
    """Expert insertion is checkpoint surgery: importing it (prune, export and the experiments do) must not
    pull in the trainer or DeepSpeed; only the job runner reaches the continual recipe."""
    import subprocess
    import sys

    code = ("import sys\nfrom molm_ds.continual import grow_checkpoint, grow_experts\n"
            "bad = sorted(n for n in sys.modules if n.startswith(('molm_ds.train', 'deepspeed')))\n"
            "assert not bad, bad\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
