"""MoEMLP and MixtureOfAttention against per-token loops (outputs and gradients).

The attention reference uses the explicit stick-breaking product formula
A_ij = sigma(z_ij) * prod_{j<l<=i} (1 - sigma(z_il)), looping over tokens, chosen experts and heads."""

import math

import pytest
import torch
import torch.nn.functional as F

from molm_ds.config import ModelConfig
from molm_ds.model import MixtureOfAttention, MoEMLP


def _cfg(**kw):
    base = dict(vocab_size=11, n_layer=1, d_model=6, n_att_experts=5, k_att=2, att_hidden=6, n_head=2,
                n_mlp_experts=5, k_mlp=2, ffd_hidden=7, gating_size=4)
    base.update(kw)
    return ModelConfig(**base)


def mlp_loop(layer, x_BTD, mask_BT):
    B, T, D = x_BTD.shape
    r = layer.router(x_BTD.reshape(B * T, D), None if mask_BT is None else mask_BT.reshape(-1))
    ex = layer.experts
    out = []
    for t in range(B * T):
        xt = x_BTD.reshape(B * T, D)[t]
        acc = torch.zeros(D)
        for s in range(r.idx_TK.shape[1]):
            e = int(r.idx_TK[t, s])
            if e >= 0:
                acc = acc + r.weights_TK[t, s] * (ex.act(xt @ ex.w1[e]) @ ex.w2[e])
        out.append(acc)
    return torch.stack(out).view(B, T, D)


def sb_weights(z, include_current):
    """Explicit product formula for one query over keys z[0..i] (the last is the current token)."""
    i = len(z) - 1
    keys = range(i + 1) if include_current else range(i)
    beta = torch.sigmoid(z)
    A = []
    for j in keys:
        a = beta[j]
        for l in range(j + 1, i + 1 if include_current else i):
            a = a * (1 - beta[l])
        A.append(a)
    return A


def moa_loop(layer, x_BTD, mask_BT, include_current):
    B, T, D = x_BTD.shape
    r = layer.router(x_BTD.reshape(B * T, D), None if mask_BT is None else mask_BT.reshape(-1))
    K = r.idx_TK.shape[1]
    idx, w = r.idx_TK.view(B, T, K), r.weights_TK.view(B, T, K)
    keys, vals = layer.shared_kv(x_BTD)
    h, d = layer.n_head, layer.head_dim
    ex = layer.experts
    rows = []
    for b in range(B):
        real = [u for u in range(T) if mask_BT is None or bool(mask_BT[b, u])]
        for t in range(T):
            acc = torch.zeros(D)
            for s in range(K):
                e = int(idx[b, t, s])
                if e < 0:
                    continue
                q = x_BTD[b, t] @ ex.w_q[e]
                heads = []
                for j in range(h):
                    qj = q[j * d : (j + 1) * d]
                    us = [u for u in real if u <= t]
                    if not include_current:
                        us = [u for u in us if u < t] + [t]  # the last entry stands for the current token
                    z = torch.stack([qj @ keys[b, u, j * d : (j + 1) * d] / math.sqrt(d) for u in us]) if us else torch.zeros(0)
                    A = sb_weights(z, include_current) if us else []
                    used = us if include_current else us[:-1]
                    o = torch.zeros(d)
                    for a, u in zip(A, used):
                        o = o + a * vals[b, u, j * d : (j + 1) * d]
                    if not include_current:
                        rem = 1 - (torch.stack(A).sum() if A else torch.tensor(0.0))
                        o = o + rem * vals[b, t, j * d : (j + 1) * d]
                    heads.append(o)
                acc = acc + w[b, t, s] * (torch.cat(heads) @ ex.w_o[e])
            rows.append(acc)
    return torch.stack(rows).view(B, T, D)


def _mask(B, T, kind):
    if kind is None:
        return None
    m = torch.ones(B, T, dtype=torch.bool)
    if kind == "left":
        m[0, : T // 2] = False
    else:
        m[-1, T - T // 2 :] = False
    return m


def _check_grads(out, ref, params):
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, params, g, allow_unused=True)
    want = torch.autograd.grad(ref, params, g, allow_unused=True)
    for a, b in zip(got, want):
        if a is None or b is None:
            assert a is None and b is None or (a if a is not None else b).abs().max() == 0
            continue
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("B,T", [(1, 1), (2, 5)])
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("kw", [{}, {"mlp_activation": "swiglu", "d_model": 5, "att_hidden": 5, "n_head": 1},
                                {"renormalize_topk": True, "router_type": "linear"}])
@pytest.mark.parametrize("pad", [None, "right"])
def test_moe_mlp_matches_loop(B, T, k, kw, pad):
    torch.manual_seed(B * 100 + T * 10 + k)
    layer = MoEMLP(_cfg(k_mlp=k, **kw))
    x = torch.randn(B, T, layer.experts.w1.shape[1], requires_grad=True)
    mask = _mask(B, T, pad)
    y, aux = layer(x, mask)
    ref = mlp_loop(layer, x, mask)
    _check_grads(y, ref, [x, *layer.parameters()])
    assert set(aux) == {"mi", "load_concentration", "switch", "z"}
    assert layer.last_routing.probs_TE.shape == (B * T, 5) and not layer.last_routing.probs_TE.requires_grad


ATT_CASES = [
    dict(d_model=6, att_hidden=6, n_head=2),
    dict(d_model=7, att_hidden=7, n_head=1),
    dict(d_model=5, att_hidden=9, n_head=3, kv_proj=True),
]


@pytest.mark.parametrize("B,T,pad", [(1, 1, None), (2, 5, None), (2, 5, "left"), (3, 4, "right")])
@pytest.mark.parametrize("k", [1, 3, 4])
@pytest.mark.parametrize("shape", range(len(ATT_CASES)))
@pytest.mark.parametrize("include_current", [True, False])
def test_moa_matches_loop(B, T, pad, k, shape, include_current):
    torch.manual_seed(B * 100 + T * 10 + k + shape)
    cfg = _cfg(k_att=k, stickbreaking_include_current=include_current, **ATT_CASES[shape])
    layer = MixtureOfAttention(cfg)
    x = torch.randn(B, T, cfg.d_model, requires_grad=True)
    mask = _mask(B, T, pad)
    y, aux, (kk, vv) = layer(x, mask, mask)
    assert kk.shape[1] == T
    ref = moa_loop(layer, x, mask, include_current)
    if mask is not None:  # padded positions are meaningless; compare real tokens only
        y, ref = y[mask], ref[mask]
    _check_grads(y, ref, [x, *layer.parameters()])


def test_moa_experts_with_no_tokens_and_one_token():
    cfg = _cfg(n_att_experts=8, k_att=1)
    torch.manual_seed(3)
    layer = MixtureOfAttention(cfg)
    x = torch.randn(1, 2, 6, requires_grad=True)
    y, _, _ = layer(x)
    assert (torch.bincount(layer.last_routing.idx_TK.flatten(), minlength=8) == 0).sum() >= 6
    _check_grads(y, moa_loop(layer, x, None, True), [x, *layer.parameters()])
