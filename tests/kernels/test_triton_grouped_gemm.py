"""Triton scattered grouped GEMM (interpreter on CPU; real GPU when present) against the references."""

import pytest
import torch

from kernels import triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton not installed")

from molm_ds.ops import grouped_gemm_reference  # noqa: E402


def _loop_experts(x_TI, w_EIO, idx_TK, gates_TK):
    """Per-token loop: y_t = sum_k gates[t,k] x_t W_idx[t,k]."""
    return torch.stack([sum(gates_TK[t, j] * (x_TI[t] @ w_EIO[idx_TK[t, j]]) for j in range(idx_TK.shape[1])) for t in range(idx_TK.shape[0])])


@pytest.mark.parametrize("counts", [[0, 7, 0, 3], [17, 0, 0], [1], [5, 1, 33, 0, 2]])
def test_grouped_layout_matches_reference(counts):
    from kernels.grouped_gemm import grouped_gemm_triton

    g = torch.Generator().manual_seed(sum(counts))
    x = torch.randn(sum(counts), 5, generator=g, requires_grad=True)
    w = torch.randn(len(counts), 5, 7, generator=g, requires_grad=True)
    c = torch.tensor(counts)
    y, y_ref = grouped_gemm_triton(x, w, c), grouped_gemm_reference(x, w, c)
    dy = torch.randn(y.shape, generator=g)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(torch.autograd.grad(y, (x, w), dy), torch.autograd.grad(y_ref, (x, w), dy)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("T,K,E,one_expert", [(1, 1, 3, False), (17, 2, 4, False), (17, 4, 6, False), (9, 3, 5, True), (67, 1, 8, True)])
def test_token_order_with_gates(T, K, E, one_expert):
    from kernels.grouped_gemm import scattered_experts

    g = torch.Generator().manual_seed(T * K + E)
    x = torch.randn(T, 6, generator=g, requires_grad=True)
    w = torch.randn(E, 6, 9, generator=g, requires_grad=True)
    if one_expert:  # every slot on expert 1 (K > 1 repeats it): all other experts get no token
        idx = torch.ones(T, K, dtype=torch.long)
    else:
        idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    gates = torch.rand(T, K, generator=g, requires_grad=True)
    y = scattered_experts(x, w, idx, gates)
    y_ref = _loop_experts(x, w, idx, gates)
    dy = torch.randn(y.shape, generator=g)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    for name, a, b in zip(["x", "w", "gates"], torch.autograd.grad(y, (x, w, gates), dy), torch.autograd.grad(y_ref, (x, w, gates), dy)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=f"d{name}")


def test_ops_switch_routes_to_triton(monkeypatch):
    from molm_ds.ops import grouped_gemm

    monkeypatch.setenv("MOLM_DS_KERNELS", "triton")
    x, w, c = torch.randn(6, 3), torch.randn(2, 3, 4), torch.tensor([2, 4])
    torch.testing.assert_close(grouped_gemm(x, w, c), grouped_gemm_reference(x, w, c), atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_realistic(dtype):
    from kernels.grouped_gemm import scattered_experts

    T, K, E, D, H = 4096, 2, 16, 512, 1024
    x = torch.randn(T, D, device="cuda", dtype=dtype, requires_grad=True)
    w = (torch.randn(E, D, H, device="cuda", dtype=dtype) / D**0.5).requires_grad_()
    idx = torch.randint(0, E, (T, K), device="cuda")
    gates = torch.rand(T, K, device="cuda", dtype=dtype, requires_grad=True)
    y = scattered_experts(x, w, idx, gates)
    y_ref = (gates[..., None] * torch.einsum("td,tkdh->tkh", x.float(), w.float()[idx])).sum(1)
    tol = 1e-2 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(y.float(), y_ref, atol=tol, rtol=tol)
    y.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all() and torch.isfinite(gates.grad).all()
