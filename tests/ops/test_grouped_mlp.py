"""Fused expert MLP (`grouped_mlp`: x -> w1 -> gelu_tanh -> w2 in one autograd Function) vs the loop."""

import pytest
import torch

from molm_ds.ops import grouped_mlp, grouped_mlp_reference


@pytest.mark.parametrize("counts", [[5], [0, 7, 0, 3], [17, 0, 0, 0], [1, 2, 3, 4, 5], [0, 0, 0], [67, 1, 33]])
@pytest.mark.parametrize("I,H,O", [(8, 12, 8), (5, 3, 7)])
def test_matches_reference(counts, I, H, O):
    g = torch.Generator().manual_seed(len(counts) * 13 + H)
    E, N = len(counts), sum(counts)
    x = torch.randn(N, I, generator=g, dtype=torch.float64, requires_grad=True)
    w1 = torch.randn(E, I, H, generator=g, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(E, H, O, generator=g, dtype=torch.float64, requires_grad=True)
    c = torch.tensor(counts)
    y_ref = grouped_mlp_reference(x, w1, w2, c)
    y = grouped_mlp(x, w1, w2, c)
    torch.testing.assert_close(y, y_ref)
    if N:
        dy = torch.randn(N, O, generator=g, dtype=torch.float64)
        want = torch.autograd.grad(y_ref, (x, w1, w2), dy)
        got = torch.autograd.grad(y, (x, w1, w2), dy)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)
        empty = torch.tensor(counts) == 0
        assert torch.all(got[1][empty] == 0) and torch.all(got[2][empty] == 0)


def test_gradcheck_and_partial_grads():
    c = torch.tensor([3, 0, 2])
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    w1 = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(3, 6, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, d: grouped_mlp(a, b, d, c), (x, w1, w2))
    # only the weights need a gradient (frozen input)
    gw1, = torch.autograd.grad(grouped_mlp(x.detach(), w1, w2, c).sum(), (w1,))
    want, = torch.autograd.grad(grouped_mlp_reference(x.detach(), w1, w2, c).sum(), (w1,))
    torch.testing.assert_close(gw1, want)


def test_bad_shapes_are_clear():
    with pytest.raises(ValueError, match="do not fit"):
        grouped_mlp(torch.randn(4, 3), torch.randn(2, 3, 5), torch.randn(2, 4, 3), torch.tensor([2, 2]))
    with pytest.raises(ValueError, match="counts sum to"):
        grouped_mlp(torch.randn(4, 3), torch.randn(2, 3, 5), torch.randn(2, 5, 3), torch.tensor([1, 2]))
