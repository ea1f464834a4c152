"""Triton stick-breaking kernels (interpreter on CPU; real GPU when present) against the reference."""

import pytest
import torch

from kernels import triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton not installed")

from molm_ds.ops import stickbreaking_reference  # noqa: E402

CASES = [
    # B, Hq, Hk, Tq, Tk, d, padded
    (1, 1, 1, 1, 1, 4, False),
    (2, 2, 1, 17, 17, 8, True),
    (1, 2, 2, 5, 67, 5, True),  # Tq < Tk, odd head dim
    (1, 1, 1, 67, 67, 16, False),
]


@pytest.mark.parametrize("include_current", [True, False])
@pytest.mark.parametrize("case", CASES)
def test_forward_backward_match_reference(case, include_current):
    from kernels.stickbreaking import stickbreaking_triton

    B, Hq, Hk, Tq, Tk, d, padded = case
    g = torch.Generator().manual_seed(Tq * 31 + Tk)
    q = torch.randn(B, Hq, Tq, d, generator=g, requires_grad=True)
    k = torch.randn(B, Hk, Tk, d, generator=g, requires_grad=True)
    v = torch.randn(B, Hk, Tk, d, generator=g, requires_grad=True)
    kpm = (torch.rand(B, Tk, generator=g) > 0.3) if padded else None
    do = torch.randn(B, Hq, Tq, d, generator=g)
    o_ref = stickbreaking_reference(q, k, v, include_current=include_current, key_padding_mask=kpm)
    o = stickbreaking_triton(q, k, v, include_current=include_current, key_padding_mask=kpm)
    torch.testing.assert_close(o, o_ref, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(o, (q, k, v), do)
    for name, a, b in zip("qkv", grads, torch.autograd.grad(o_ref, (q, k, v), do)):
        assert torch.isfinite(a).all(), f"d{name} not finite"
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=f"d{name}")


@pytest.mark.parametrize("include_current", [True, False])
def test_decode_matches_last_row(include_current):
    from kernels.stickbreaking import stickbreaking_decode

    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 4, 1, 8, generator=g), torch.randn(2, 2, 67, 8, generator=g)
    kpm = torch.rand(2, 67, generator=g) > 0.2
    o = stickbreaking_decode(q, k, k, include_current=include_current, key_padding_mask=kpm)
    o_ref = stickbreaking_reference(q, k, k, include_current=include_current, key_padding_mask=kpm)
    torch.testing.assert_close(o, o_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("include_current", [True, False])
def test_varlen_matches_per_sequence_reference(include_current):
    from kernels.stickbreaking import stickbreaking_varlen

    g = torch.Generator().manual_seed(5)
    cu = torch.tensor([0, 1, 18, 25])
    q = torch.randn(2, 25, 8, generator=g, requires_grad=True)
    k = torch.randn(1, 25, 8, generator=g, requires_grad=True)
    o = stickbreaking_varlen(q, k, k, cu, include_current=include_current)
    parts = [stickbreaking_reference(q[None, :, s:e], k[None, :, s:e], k[None, :, s:e], include_current=include_current)[0] for s, e in zip(cu[:-1].tolist(), cu[1:].tolist())]
    o_ref = torch.cat(parts, dim=1)
    torch.testing.assert_close(o, o_ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(torch.autograd.grad(o.sum(), (q, k)), torch.autograd.grad(o_ref.sum(), (q, k))):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_no_nan_when_everything_is_masked():
    from kernels.stickbreaking import stickbreaking_triton

    q = torch.randn(1, 1, 5, 8, requires_grad=True)
    k = torch.randn(1, 1, 5, 8, requires_grad=True)
    kpm = torch.zeros(1, 5, dtype=torch.bool)
    o = stickbreaking_triton(q, k, k, key_padding_mask=kpm)
    gq, gk = torch.autograd.grad(o.sum(), (q, k))
    assert torch.all(o == 0) and torch.all(gq == 0) and torch.isfinite(gk).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("include_current", [True, False])
def test_gpu_realistic(include_current):
    from kernels.stickbreaking import stickbreaking_triton

    q, k, v = (torch.randn(2, 8, 1024, 64, device="cuda", requires_grad=True) for _ in range(3))
    o = stickbreaking_triton(q, k, v, include_current=include_current)
    o_ref = stickbreaking_reference(q, k, v, include_current=include_current)
    torch.testing.assert_close(o, o_ref, atol=2e-3, rtol=2e-3)
    grads = torch.autograd.grad(o.sum(), (q, k, v))
    for a, b in zip(grads, torch.autograd.grad(o_ref.sum(), (q, k, v))):
        torch.testing.assert_close(a, b, atol=1e-2, rtol=1e-2)
