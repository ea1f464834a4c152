"""The Triton grouped GEMM paths the model runs, under the interpreter, against the references: outputs
and every gradient, over awkward counts (experts without rows, one expert with all of them, a single
row, no rows) and widths that cross the interpreter's 16/32 tiles.

Paths: grouped in / grouped out (attention projections; MLP experts behind an all-to-all), gathered
in (the MLP's first GEMM reads x by slot), scattered out (its backward), gated (the MLP's second GEMM
with the gate-weighted combine folded in)."""

import pytest
import torch

from molm_ds.ops import grouped_gemm, grouped_gemm_gated, grouped_gemm_gated_reference, grouped_gemm_reference
from molm_ds.ops.grouped_gemm import GroupCounts

COUNTS = [[0, 7, 0, 3], [17, 0, 0], [1], [5, 1, 33, 0, 2], [0, 0]]


def _grads(y, inputs, dy):
    return torch.autograd.grad(y, inputs, dy, allow_unused=True)


def _close(got, want, names, tol=1e-4):
    for name, a, b in zip(names, got, want):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("counts", COUNTS)
@pytest.mark.parametrize("I,O", [(5, 7), (37, 45)])
def test_grouped_rows(counts, I, O):
    g = torch.Generator().manual_seed(sum(counts) + I)
    x = torch.randn(sum(counts), I, generator=g, requires_grad=True)
    w = torch.randn(len(counts), I, O, generator=g, requires_grad=True)
    c = torch.tensor(counts)
    y, y_ref = grouped_gemm(x, w, c), grouped_gemm_reference(x, w, c)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    if y.numel():
        dy = torch.randn(y.shape, generator=g)
        _close(_grads(y, (x, w), dy), _grads(y_ref, (x, w), dy), "xw")


def _routing(T, K, E, g, drop):
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    if drop and T > 2:
        idx[1, 0] = -1
        idx[T - 1, K - 1] = -1
    flat = idx.reshape(-1)
    key = torch.where(flat >= 0, flat, E)
    order = torch.argsort(key, stable=True)[: int((flat >= 0).sum())]
    counts = torch.bincount(flat[flat >= 0], minlength=E)
    return idx, order, counts


@pytest.mark.parametrize("T,K,E,drop", [(1, 1, 3, False), (17, 2, 4, True), (9, 3, 5, False), (13, 4, 6, True)])
def test_gathered_in_and_scattered_out(T, K, E, drop):
    g = torch.Generator().manual_seed(T * K + E)
    _, order, counts = _routing(T, K, E, g, drop)
    x = torch.randn(T, 6, generator=g, requires_grad=True)
    w = torch.randn(E, 6, 9, generator=g, requires_grad=True)
    for kw in ({"src_N": order, "fan_in": K},  # read x[slot // K]: the MLP's first GEMM
               {"src_N": order, "fan_in": K, "dst_N": order, "out_rows": T * K}):  # and write back to slots
        y, y_ref = grouped_gemm(x, w, counts, **kw), grouped_gemm_reference(x, w, counts, **kw)
        torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
        dy = torch.randn(y.shape, generator=g)
        _close(_grads(y, (x, w), dy), _grads(y_ref, (x, w), dy), "xw")
    x_N = torch.randn(order.numel(), 6, generator=g, requires_grad=True)  # grouped in, scattered to slots
    y = grouped_gemm(x_N, w, counts, dst_N=order, out_rows=T * K)
    y_ref = grouped_gemm_reference(x_N, w, counts, dst_N=order, out_rows=T * K)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    dy = torch.randn(y.shape, generator=g)
    _close(_grads(y, (x_N, w), dy), _grads(y_ref, (x_N, w), dy), "xw")


@pytest.mark.parametrize("T,K,E,drop", [(1, 1, 3, False), (17, 2, 4, True), (9, 3, 5, False), (13, 4, 6, True), (40, 1, 2, False)])
def test_gated(T, K, E, drop):
    g = torch.Generator().manual_seed(7 * T + K)
    idx, order, counts = _routing(T, K, E, g, drop)
    x = torch.randn(order.numel(), 11, generator=g, requires_grad=True)
    w = torch.randn(E, 11, 37, generator=g, requires_grad=True)
    gates = torch.rand(T, K, generator=g).masked_fill(idx < 0, 0.0).requires_grad_()
    y = grouped_gemm_gated(x, w, counts, gates, order)
    y_ref = grouped_gemm_gated_reference(x, w, counts, gates, order)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    dy = torch.randn(y.shape, generator=g)
    got, want = _grads(y, (x, w, gates), dy), _grads(y_ref, (x, w, gates), dy)
    _close(got, want, ["x", "w", "gates"])
    assert torch.all(got[2][idx < 0] == 0), "a dropped slot gets no gate gradient"


def test_backward_is_bitwise_repeatable():
    g = torch.Generator().manual_seed(3)
    T, K, E = 21, 2, 3
    idx, order, counts = _routing(T, K, E, g, False)
    x = torch.randn(T, 16, generator=g, requires_grad=True)
    w1 = torch.randn(E, 16, 24, generator=g, requires_grad=True)
    w2 = torch.randn(E, 24, 16, generator=g, requires_grad=True)
    gates = torch.rand(T, K, generator=g, requires_grad=True)
    dy = torch.randn(T, 16, generator=g)

    def grads():
        h = grouped_gemm(x, w1, counts, src_N=order, fan_in=K)
        y = grouped_gemm_gated(torch.nn.functional.gelu(h), w2, counts, gates, order)
        return torch.autograd.grad(y, (x, w1, w2, gates), dy)

    first, second = grads(), grads()
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_counts_on_the_device_only():
    """The Triton path takes counts without a host list (what a GPU dispatcher hands it)."""
    x, w = torch.randn(6, 3), torch.randn(2, 3, 4)
    counts = GroupCounts(torch.tensor([2, 4]))  # no host list
    torch.testing.assert_close(grouped_gemm(x, w, counts), grouped_gemm_reference(x, w, [2, 4]), atol=1e-5, rtol=1e-5)
    assert counts._host is None, "the Triton path must not convert the counts on the host"


def test_bf16_against_fp32_reference():
    g = torch.Generator().manual_seed(11)
    T, K, E = 21, 2, 3
    idx, order, counts = _routing(T, K, E, g, True)
    x = torch.randn(order.numel(), 24, generator=g)
    w = torch.randn(E, 24, 40, generator=g) / 5
    gates = torch.rand(T, K, generator=g).masked_fill(idx < 0, 0.0)
    y = grouped_gemm_gated(x.bfloat16(), w.bfloat16(), counts, gates, order)
    y_ref = grouped_gemm_gated_reference(x.bfloat16().float(), w.bfloat16().float(), counts, gates, order)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y_ref, atol=2e-2, rtol=2e-2)


def test_no_atomics_in_the_kernels():
    import inspect

    from molm_ds.kernels.grouped_gemm import launch

    src = inspect.getsource(launch)
    assert "tl.atomic" not in src and "while" not in src, "no atomics and no spin loops: every output has one writer"


def test_triton_ops_pass_opcheck():
    g = torch.Generator().manual_seed(0)
    T, K, E = 6, 2, 3
    _, order, counts = _routing(T, K, E, g, False)
    x = torch.randn(T, 4, generator=g, requires_grad=True)
    w = torch.randn(E, 4, 5, generator=g, requires_grad=True)
    x_N = torch.randn(T * K, 4, generator=g, requires_grad=True)
    gates = torch.rand(T, K, generator=g, requires_grad=True)
    ops = torch.ops.molm_ds  # the PyTorch path's opcheck (tests/ops) covers grouped_gemm's other modes
    torch.library.opcheck(ops.grouped_gemm, (x, w, counts, None, order, None, K, T * K, True),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    torch.library.opcheck(ops.grouped_gemm_gated, (x_N, w, counts, None, gates, order, True))
