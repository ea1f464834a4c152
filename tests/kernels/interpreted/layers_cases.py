"""The model's layers on the Triton kernels (interpreter) against the same layers on the PyTorch paths:
outputs and every parameter's gradient. This covers the kernel paths exactly as the layers call them:
the MLP's fused path (gather in GEMM 1, gated combine in GEMM 2), the MLP behind a dispatcher that
moves rows (grouped in / grouped out, as under the all-to-all), attention (grouped projections and the
stick-breaking kernels, with padding)."""

import os

import pytest
import torch

from molm_ds.config import ModelConfig
from molm_ds.model import MixtureOfAttention, MoEMLP
from molm_ds.model.dispatch import DispatchPlan, LocalDispatcher


def _cfg(**kw):
    base = dict(vocab_size=11, n_layer=1, d_model=24, n_att_experts=5, k_att=2, att_hidden=24, n_head=2,
                n_mlp_experts=5, k_mlp=2, ffd_hidden=40, gating_size=8)
    base.update(kw)
    return ModelConfig(**base)


class _MovingDispatcher(LocalDispatcher):
    """Hands out plans without token slots, as the all-to-all dispatcher does: the layer dispatches,
    runs the experts on grouped rows and combines."""

    def plan(self, idx_TK, *, dropless=False):
        p = super().plan(idx_TK, dropless=dropless)
        moving = DispatchPlan(p.counts, p.T, p.K)
        moving.order_N, moving.token_N = p.order_N, p.token_N
        return moving


def _run(layer, x, mask, backend, monkeypatch):
    monkeypatch.setenv("MOLM_DS_KERNELS", backend)
    xi = x.clone().requires_grad_()
    out = layer(xi, mask, mask) if isinstance(layer, MixtureOfAttention) else layer(xi, mask)
    y, aux = out[0], out[1]
    loss = (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum() + sum(aux.values())
    grads = torch.autograd.grad(loss, [xi, *layer.parameters()])
    return y.detach(), grads


def _compare(layer, x, mask, monkeypatch):
    y_t, g_t = _run(layer, x, mask, "triton", monkeypatch)
    y_c, g_c = _run(layer, x, mask, "torch", monkeypatch)
    torch.testing.assert_close(y_t, y_c, atol=1e-5, rtol=1e-5)
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    for name, a, b in zip(names, g_t, g_c):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("activation,moving,pad", [("gelu_tanh", False, False), ("gelu_tanh", True, True),
                                                   ("swiglu", False, True), ("swiglu", True, False)])
def test_moe_mlp(activation, moving, pad, monkeypatch):
    torch.manual_seed(1)
    layer = MoEMLP(_cfg(mlp_activation=activation))
    if moving:
        layer.dispatcher = _MovingDispatcher(layer.num_experts)
    x = torch.randn(2, 9, 24)
    mask = None
    if pad:
        mask = torch.ones(2, 9, dtype=torch.bool)
        mask[1, 6:] = False  # padded tokens: dropped slots
    _compare(layer, x, mask, monkeypatch)


@pytest.mark.parametrize("include_current", [True, False])
def test_mixture_of_attention(include_current, monkeypatch):
    torch.manual_seed(2)
    layer = MixtureOfAttention(_cfg(stickbreaking_include_current=include_current))
    x = torch.randn(2, 11, 24)
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[0, :3] = False  # left padding
    _compare(layer, x, mask, monkeypatch)


def test_runs_under_the_interpreter():
    assert os.environ.get("TRITON_INTERPRET") == "1"
