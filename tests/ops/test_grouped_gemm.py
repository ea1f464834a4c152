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


def _routing(T, K, E, g, drop):
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    if drop and T > 2:
        idx[1, 0] = -1
    flat = idx.reshape(-1)
    order = torch.argsort(torch.where(flat >= 0, flat, E), stable=True)[: int((flat >= 0).sum())]
    return idx, order, torch.bincount(flat[flat >= 0], minlength=E)


@pytest.mark.parametrize("T,K,E,drop", [(1, 1, 3, False), (7, 2, 4, True), (9, 3, 5, False), (5, 4, 6, True)])
def test_gather_scatter_and_gated_match_reference(T, K, E, drop):
    """The paths the MLP runs (gather by slot into GEMM 1, gated combine out of GEMM 2) and the scattered
    output their backward uses, on the PyTorch path, in fp64: outputs and every gradient."""
    from molm_ds.ops import grouped_gemm_gated, grouped_gemm_gated_reference

    g = torch.Generator().manual_seed(T * 10 + K)
    idx, order, counts = _routing(T, K, E, g, drop)
    x = torch.randn(T, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(E, 5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    for kw in ({"src_N": order, "fan_in": K}, {"src_N": order, "fan_in": K, "dst_N": order, "out_rows": T * K}):
        y, y_ref = grouped_gemm(x, w, counts, **kw), grouped_gemm_reference(x, w, counts, **kw)
        torch.testing.assert_close(y, y_ref)
        dy = torch.randn(y.shape, generator=g, dtype=torch.float64)
        for a, b in zip(torch.autograd.grad(y, (x, w), dy), torch.autograd.grad(y_ref, (x, w), dy)):
            torch.testing.assert_close(a, b)
    x_N = torch.randn(order.numel(), 5, generator=g, dtype=torch.float64, requires_grad=True)
    gates = torch.rand(T, K, generator=g, dtype=torch.float64).masked_fill(idx < 0, 0.0).requires_grad_()
    y = grouped_gemm_gated(x_N, w, counts, gates, order)
    y_ref = grouped_gemm_gated_reference(x_N, w, counts, gates, order)
    torch.testing.assert_close(y, y_ref)
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(y, (x_N, w, gates), dy), torch.autograd.grad(y_ref, (x_N, w, gates), dy)):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(lambda a, b, c: grouped_gemm_gated(a, b, counts, c, order), (x_N, w, gates))
    assert torch.autograd.gradcheck(lambda a, b: grouped_gemm(a, b, counts, src_N=order, fan_in=K), (x, w))


def test_custom_ops_pass_opcheck():
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch of every op."""
    g = torch.Generator().manual_seed(0)
    T, K, E = 6, 2, 3
    idx, order, counts = _routing(T, K, E, g, False)
    x = torch.randn(T, 4, generator=g, requires_grad=True)
    w = torch.randn(E, 4, 5, generator=g, requires_grad=True)
    x_N = torch.randn(T * K, 4, generator=g, requires_grad=True)
    gates = torch.rand(T, K, generator=g, requires_grad=True)
    ops = torch.ops.molm_ds
    host = counts.tolist()
    torch.library.opcheck(ops.grouped_gemm, (x, w, counts, host, order, None, K, T * K, False))
    torch.library.opcheck(ops.grouped_gemm, (x_N, w, counts, None, None, order, 1, T * K, False))
    torch.library.opcheck(ops.grouped_gemm_gated, (x_N, w, counts, host, gates, order, False))


def test_bad_gated_arguments_are_clear():
    from molm_ds.ops import grouped_gemm_gated

    with pytest.raises(ValueError, match="one per row"):
        grouped_gemm_gated(torch.randn(4, 3), torch.randn(2, 3, 5), torch.tensor([2, 2]), torch.rand(2, 2), torch.arange(3))
    with pytest.raises(ValueError, match="give out_rows"):
        grouped_gemm(torch.randn(4, 3), torch.randn(2, 3, 5), torch.tensor([2, 2]), dst_N=torch.arange(4))


def test_package_imports_and_runs_without_triton():
    """No Triton (or a broken install): the package imports, reports it, and the layers run on the PyTorch paths."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, molm_ds.kernels, molm_ds.ops, molm_ds.model\n"
        "from molm_ds.config import ModelConfig\n"
        "assert not molm_ds.kernels.triton_available()\n"
        "m = molm_ds.model.MoLM(ModelConfig.from_preset('tiny'))\n"
        "m(torch.randint(0, 512, (1, 9))).logits.sum().backward()\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
