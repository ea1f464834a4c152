"""Grouped GEMM fast path (per-expert loop with a hand-written backward) against the reference."""

import pytest
import torch

from molm_ds.ops import grouped_gemm, grouped_gemm_reference

COUNTS = [
    [5],  # one expert
    [0, 7, 0, 3],  # experts with no rows
    [17, 0, 0, 0],  # all rows on one expert
    [1, 2, 3, 4, 5],
    [0, 0, 0],  # no rows at all
    [67, 1, 33],
]


@pytest.mark.parametrize("counts", COUNTS)
@pytest.mark.parametrize("I,O", [(8, 12), (5, 3)])
def test_matches_reference(counts, I, O):
    g = torch.Generator().manual_seed(len(counts) * 7 + I)
    E, N = len(counts), sum(counts)
    x = torch.randn(N, I, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(E, I, O, generator=g, dtype=torch.float64, requires_grad=True)
    c = torch.tensor(counts)
    dy = torch.randn(N, O, generator=g, dtype=torch.float64)
    y_ref = grouped_gemm_reference(x, w, c)
    y = grouped_gemm(x, w, c)
    torch.testing.assert_close(y, y_ref)
    if N:
        gx_ref, gw_ref = torch.autograd.grad(y_ref, (x, w), dy)
        gx, gw = torch.autograd.grad(y, (x, w), dy)
        torch.testing.assert_close(gx, gx_ref)
        torch.testing.assert_close(gw, gw_ref)
        assert torch.all(gw[torch.tensor(counts) == 0] == 0)


def test_non_contiguous_input():
    x = torch.randn(12, 10, dtype=torch.float64)[:, ::2].requires_grad_()
    w = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    c = torch.tensor([4, 8])
    torch.testing.assert_close(grouped_gemm(x, w, c), grouped_gemm_reference(x, w, c))
    assert torch.autograd.gradcheck(lambda a, b: grouped_gemm(a, b, c), (x, w))


def test_bad_counts_are_clear():
    with pytest.raises(ValueError, match="counts sum to"):
        grouped_gemm(torch.randn(4, 3), torch.randn(2, 3, 5), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="do not fit"):
        grouped_gemm(torch.randn(4, 3), torch.randn(2, 4, 5), torch.tensor([2, 2]))
    with pytest.raises(ValueError, match="must be \\[E\\]"):
        grouped_gemm(torch.randn(4, 3), torch.randn(2, 3, 5), torch.tensor([2, 1, 1]))
