"""Memory and precision for real shapes: activation checkpointing per block (same losses and gradients,
fewer saved activations), and bf16 end to end with fp32 router softmax, gates and losses."""

import pytest
import torch

from molm_ds.config import ModelConfig
from molm_ds.model import MoLM
from molm_ds.train.evaluate import lm_loss


def _ids(cfg, B=2, T=13, seed=0):
    return torch.randint(0, cfg.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(seed))


def _loss(model, ids, mask=None):
    out = model(ids[:, :-1], attention_mask=mask)
    return lm_loss(logits_BTV=out.logits, labels_BT=ids[:, 1:]) + 0.01 * out.aux["mi"] + 0.1 * out.aux["z"], out


def _saved_bytes(fn):
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0]


@pytest.mark.parametrize("kw", [{}, {"dropout": 0.1, "sample_topk": 1}, {"capacity_factor": 1.0}])
def test_activation_checkpointing_same_losses_and_gradients(kw):
    """Dropout and sampled top-k draw random numbers in the forward: the recomputation replays them."""
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", **kw)
    model = MoLM(cfg)
    ids = _ids(cfg)
    mask = torch.ones(2, 13, dtype=torch.long)
    mask[1, :4] = 0
    results = []
    for on in (False, True):
        model.activation_checkpointing = on
        torch.manual_seed(1)
        loss, _ = _loss(model, ids, mask)
        results.append((loss.detach(), torch.autograd.grad(loss, list(model.parameters()))))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    for (name, _), a, b in zip(model.named_parameters(), results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")


def test_activation_checkpointing_keeps_fewer_activations():
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", n_layer=4)
    model = MoLM(cfg)
    ids = _ids(cfg, T=32)
    sizes = {}
    for on in (False, True):
        model.activation_checkpointing = on
        sizes[on] = _saved_bytes(lambda: _loss(model, ids))
    assert sizes[True] < 0.5 * sizes[False], sizes
    model.eval()  # no recomputation outside training
    model.activation_checkpointing = True
    with torch.no_grad():
        model(ids[:, :-1])


@pytest.mark.slow
def test_job_option_trains_like_without(tmp_path):
    """training.activation_checkpointing through train(): the loop sets it on the model it builds, and the
    run's losses and gradient norms equal the run without it."""
    from molm_ds.train import load_job, loop
    from molm_ds.testing import TINY_JOB, read_metrics, tiny_job_overrides, write_shard

    shard = write_shard(tmp_path / "data")
    seen, rows = [], {}
    real_build = loop.build_engine

    def build_engine(job, recipe, model, ds):
        seen.append(model.activation_checkpointing)
        return real_build(job, recipe, model, ds)

    loop.build_engine = build_engine
    try:
        for on in (False, True):
            run_dir = tmp_path / f"ckpt_{on}"
            job = load_job(TINY_JOB, tiny_job_overrides(shard, run_dir) + [
                "training.steps=3", "training.eval_interval=0", "checkpoint.interval=0", "checkpoint.save_final=false",
                "monitor.tensorboard=false", f"training.activation_checkpointing={str(on).lower()}"])
            loop.train(job)
            rows[on] = read_metrics(run_dir)
    finally:
        loop.build_engine = real_build
    assert seen == [False, True]
    for step in (1, 2, 3):
        for key in ("loss", "grad_norm"):
            assert rows[True][step][key] == pytest.approx(rows[False][step][key], rel=1e-6), (step, key)


def test_bf16_end_to_end_keeps_router_and_losses_in_fp32(monkeypatch):
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny")
    model32 = MoLM(cfg)
    model16 = MoLM(cfg).to(torch.bfloat16)
    model16.load_state_dict({k: v.to(torch.bfloat16) for k, v in model32.state_dict().items()})
    ids = _ids(cfg, T=24)
    loss32, _ = _loss(model32, ids)
    loss16, out16 = _loss(model16, ids)
    assert out16.logits.dtype == torch.bfloat16
    assert loss16.dtype == torch.float32 and all(v.dtype == torch.float32 for v in out16.aux.values())
    for layer in model16.moe_layers():
        assert layer.last_routing.probs_TE.dtype == torch.float32, "router softmax stays fp32 under bf16"
    rec = {}
    hook = model16.blocks[0].mlpf.router.register_forward_hook(lambda m, a, out: rec.update(w=out.weights_TK))
    _loss(model16, ids)
    hook.remove()
    assert rec["w"].dtype == torch.float32, "gates stay fp32 until they scale the expert rows"
    assert abs(loss16.item() - loss32.item()) < 0.02 * loss32.item()
    loss16.backward()
    for name, p in model16.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.bfloat16 and torch.isfinite(p.grad).all(), name
