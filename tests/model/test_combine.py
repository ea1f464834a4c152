"""Dispatcher.combine (fused unpermute + gate sum) against its slow path, undispatch then the weighted sum."""

import pytest
import torch

from molm_ds.config import ModelConfig
from molm_ds.model.dispatch import DispatchPlan, LocalDispatcher, combine_reference
from molm_ds.model.moe import MoEMLP


class _UnfusedDispatcher(LocalDispatcher):
    """The local dispatcher on the generic path: its plans carry no token slots (as the all-to-all one's),
    so the layer dispatches, runs the experts on grouped rows and combines; its combine is the slow path
    (undispatch, then the weighted sum)."""

    def plan(self, idx_TK, *, dropless=False):
        p = super().plan(idx_TK, dropless=dropless)
        generic = DispatchPlan(p.counts, p.T, p.K)
        generic.order_N, generic.token_N = p.order_N, p.token_N
        return generic

    def combine(self, y_ND, weights_TK, plan):
        return combine_reference(weights_TK, self.undispatch(y_ND, plan))


@pytest.mark.parametrize("T,K,E,D", [(1, 1, 3, 4), (9, 2, 4, 5), (17, 4, 6, 3)])
@pytest.mark.parametrize("drop", [False, True])
def test_combine_matches_undispatch_then_sum(T, K, E, D, drop):
    g = torch.Generator().manual_seed(T * 7 + K)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    if drop:
        idx[0, 0] = -1
        idx[T // 2, K - 1] = -1
    w = torch.rand(T, K, generator=g, dtype=torch.float64).masked_fill(idx < 0, 0.0).requires_grad_()
    x = torch.randn(T, D, generator=g, dtype=torch.float64, requires_grad=True)
    disp = LocalDispatcher(E)
    plan = disp.plan(idx)
    x_ND = disp.dispatch(x, plan)
    y_ND = x_ND * torch.arange(1, x_ND.shape[0] + 1, dtype=torch.float64)[:, None]  # row-dependent stand-in for experts
    got = disp.combine(y_ND, w, plan)
    want = (w[..., None] * disp.undispatch(y_ND, plan)).sum(1)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(combine_reference(w, disp.undispatch(y_ND, plan)), want)
    dy = torch.randn(T, D, generator=g, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(got, (x, w), dy, retain_graph=True), torch.autograd.grad(want, (x, w), dy)):
        torch.testing.assert_close(a, b)


def test_combine_rejects_mismatch():
    disp = LocalDispatcher(3)
    plan = disp.plan(torch.zeros(4, 2, dtype=torch.long))
    x_ND = disp.dispatch(torch.randn(4, 2), plan)
    with pytest.raises(ValueError, match="do not match"):
        disp.combine(x_ND, torch.rand(4, 3), plan)
    with pytest.raises(ValueError, match="do not match"):
        disp.combine(x_ND[:5], torch.rand(4, 2), plan)


@pytest.mark.parametrize("activation", ["gelu_tanh", "swiglu"])
@pytest.mark.parametrize("capacity", [None, 0.5])
def test_moe_mlp_fused_path_equals_generic(activation, capacity):
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=8, att_hidden=8, n_mlp_experts=4, k_mlp=2, ffd_hidden=6, gating_size=5,
                      mlp_activation=activation, capacity_factor=capacity)
    fused = MoEMLP(cfg).double()
    generic = MoEMLP(cfg).double()
    generic.load_state_dict(fused.state_dict())
    generic.dispatcher = _UnfusedDispatcher(fused.num_experts)
    x = torch.randn(2, 7, 8, dtype=torch.float64)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 5:] = False  # padded tokens: dropped slots
    outs, fused_calls = [], []
    for m in (fused, generic):
        real = m.experts.forward_tokens
        m.experts.forward_tokens = lambda *a, _m=m, _real=real: (fused_calls.append(_m), _real(*a))[1]
        xi = x.clone().requires_grad_()
        y, aux = m(xi, mask)
        loss = (y * torch.linspace(-1, 1, y.numel(), dtype=torch.float64).view_as(y)).sum() + sum(aux.values())
        outs.append((y, torch.autograd.grad(loss, [xi, *m.parameters()])))
    assert fused_calls == [fused], "the local plan takes the fused expert path, the generic one does not"
    torch.testing.assert_close(outs[0][0], outs[1][0])
    for a, b in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(a, b)
