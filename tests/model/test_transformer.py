import pytest
import torch
import torch.nn.functional as F

from molm_ds.config import ModelConfig
from molm_ds.model import MoLM


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = ModelConfig.from_preset("tiny", **kw)
    m = MoLM(cfg).eval()
    # larger router weights so that routing is not nearly uniform (a stronger test)
    for layer in m.moe_layers():
        torch.nn.init.normal_(layer.router.w_gate, std=1.0)
    return m


@pytest.mark.parametrize("kw", [{}, {"stickbreaking_include_current": False}, {"kv_proj": True, "att_hidden": 48, "n_head": 3}])
def test_param_count_matches_config(kw):
    m = _model(**kw)
    assert sum(p.numel() for p in m.parameters()) == m.config.total_params


def test_param_count_swiglu_linear_router():
    m = _model(mlp_activation="swiglu", router_type="linear")
    assert sum(p.numel() for p in m.parameters()) == m.config.total_params


@pytest.mark.parametrize("include_current", [True, False])
def test_causality(include_current):
    m = _model(stickbreaking_include_current=include_current)
    x = torch.randint(0, 512, (2, 10))
    base = m(x).logits
    for t in [0, 4, 9]:
        y = x.clone()
        y[:, t] = (y[:, t] + 7) % 512
        out = m(y).logits
        torch.testing.assert_close(out[:, :t], base[:, :t], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(out[:, t], base[:, t])


@pytest.mark.parametrize("include_current", [True, False])
@pytest.mark.parametrize("padded", [False, True])
def test_kv_cache_decode_equals_full_forward(include_current, padded):
    m = _model(seed=1, stickbreaking_include_current=include_current)
    x = torch.randint(0, 512, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    if padded:
        mask[0, :3] = 0  # left padding on row 0
    full = m(x, attention_mask=mask).logits
    out = m(x[:, :4], attention_mask=mask[:, :4], use_cache=True)
    steps = [out.logits]
    past = out.past_key_values
    for t in range(4, 9):
        o = m(x[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=past, use_cache=True)
        steps.append(o.logits)
        past = o.past_key_values
    inc = torch.cat(steps, dim=1)
    real = mask.bool()
    torch.testing.assert_close(inc[real], full[real], atol=1e-5, rtol=1e-5)
    assert past[0][0].shape[1] == 9


@pytest.mark.parametrize("include_current", [True, False])
def test_padding_does_not_change_real_tokens(include_current):
    m = _model(seed=2, stickbreaking_include_current=include_current)
    x = torch.randint(1, 512, (1, 6))
    alone = m(x)
    left = torch.cat([torch.zeros(1, 3, dtype=torch.long), x], 1)
    lmask = torch.cat([torch.zeros(1, 3), torch.ones(1, 6)], 1).long()
    right = torch.cat([x, torch.zeros(1, 3, dtype=torch.long)], 1)
    rmask = torch.cat([torch.ones(1, 6), torch.zeros(1, 3)], 1).long()
    lo = m(left, attention_mask=lmask)
    ro = m(right, attention_mask=rmask)
    torch.testing.assert_close(lo.logits[:, 3:], alone.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ro.logits[:, :6], alone.logits, atol=1e-5, rtol=1e-5)
    # padded tokens are excluded from the aux losses
    for k in alone.aux:
        torch.testing.assert_close(lo.aux[k], alone.aux[k], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ro.aux[k], alone.aux[k], atol=1e-5, rtol=1e-5)


def test_aux_is_sum_over_sublayers():
    from molm_ds import losses

    m = _model()
    out = m(torch.randint(0, 512, (2, 5)))
    want = sum(losses.mi_loss(probs_TE=l.last_routing.probs_TE) for l in m.moe_layers())
    torch.testing.assert_close(out.aux["mi"], want)
    assert sorted(out.aux) == ["load_concentration", "mi", "switch", "z"]


def test_bad_mask_shape():
    m = _model()
    with pytest.raises(ValueError, match="past \\+ T"):
        m(torch.zeros(1, 4, dtype=torch.long), attention_mask=torch.ones(1, 3))


def test_generate_greedy_matches_argmax_loop():
    m = _model(seed=3)
    x = torch.randint(0, 512, (2, 4))
    out = m.generate(x, 5)
    seq = x
    for _ in range(5):
        nxt = m(seq).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    assert torch.equal(out, seq)


def test_generate_left_padded_matches_unpadded():
    m = _model(seed=4)
    a = torch.randint(1, 512, (1, 5))
    b = torch.randint(1, 512, (1, 3))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 2, dtype=torch.long), b], 1)])
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, :2] = 0
    out = m.generate(batch, 4, attention_mask=mask)
    assert torch.equal(out[0], m.generate(a, 4)[0])
    assert torch.equal(out[1, 2:], m.generate(b, 4)[0])


def test_generate_sampling_top_k():
    m = _model(seed=5)
    x = torch.randint(0, 512, (3, 2))
    g = torch.Generator().manual_seed(0)
    out = m.generate(x, 6, do_sample=True, temperature=0.7, top_k=1, generator=g)
    assert torch.equal(out, m.generate(x, 6))  # top_k=1 sampling is greedy
    g = torch.Generator().manual_seed(0)
    s1 = m.generate(x, 6, do_sample=True, temperature=2.0, generator=g)
    assert s1.shape == (3, 8) and ((0 <= s1) & (s1 < 512)).all()
    with pytest.raises(ValueError, match="temperature"):
        m.generate(x, 2, do_sample=True, temperature=0)


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    m = MoLM(ModelConfig.from_preset("tiny")).train()
    x = torch.randint(0, 512, (2, 16))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    first = None
    for step in range(25):
        out = m(x[:, :-1])
        ce = F.cross_entropy(out.logits.reshape(-1, 512), x[:, 1:].reshape(-1))
        loss = ce + 0.01 * out.aux["mi"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = ce.item() if first is None else first
    assert first > 5.5 and ce.item() < 0.5, (first, ce.item())


@pytest.mark.parametrize("kw", [dict(routing="expert_choice"), dict(capacity_factor=0.5), dict(sample_topk=1),
                                dict(routing="expert_choice", capacity_factor=2.0, renormalize_topk=True)])
def test_routing_options_train_and_eval(kw):
    m = _model(seed=6, **kw).train()
    x = torch.randint(0, 512, (2, 6))
    out = m(x)
    out.logits.sum().backward()
    assert all(p.grad is not None for p in m.lm_head.parameters())
    assert torch.isfinite(out.logits).all() and all(torch.isfinite(v) for v in out.aux.values())
    m.eval()  # eval routing is token choice (expert choice falls back), still causal
    base = m(x).logits
    y = x.clone()
    y[:, -1] = (y[:, -1] + 1) % 512
    torch.testing.assert_close(m(y).logits[:, :-1], base[:, :-1], atol=1e-5, rtol=1e-5)
