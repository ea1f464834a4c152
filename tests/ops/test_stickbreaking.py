"""Block-wise stick-breaking (CPU fast path) against the O(T^2) reference, outputs and all gradients;
the reference itself against a brute-force product formula."""

import math

import pytest
import torch

from molm_ds.ops import stickbreaking_attention, stickbreaking_reference
from molm_ds.ops.stickbreaking_cpu import stickbreaking_blockwise


def _brute(q, k, v, include_current, kpm):
    """Direct product formula, one (b, h, i) at a time, in float64."""
    B, Hq, Tq, d = q.shape
    Hk, Tk = k.shape[1], k.shape[2]
    o = torch.zeros(B, Hq, Tq, d, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            hk = h // (Hq // Hk)
            for i in range(Tq):
                pos = Tk - Tq + i
                keys = [j for j in range(Tk) if (j <= pos if include_current else j < pos) and (kpm is None or kpm[b, j])]
                beta = {j: torch.sigmoid(q[b, h, i].double() @ k[b, hk, j].double() / math.sqrt(d)) for j in keys}
                tot = 0.0
                for j in keys:
                    a = beta[j]
                    for l in keys:
                        if l > j:
                            a = a * (1 - beta[l])
                    o[b, h, i] += a * v[b, hk, j].double()
                    tot = tot + a
                if not include_current:
                    o[b, h, i] += (1 - tot) * v[b, hk, pos].double()
    return o


@pytest.mark.parametrize("include_current", [True, False])
def test_reference_matches_brute_force(include_current):
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 1, 5, 4), torch.randn(1, 1, 5, 4)
    kpm = torch.tensor([[True, False, True, True, True]])
    o = stickbreaking_reference(q, k, v, include_current=include_current, key_padding_mask=kpm)
    torch.testing.assert_close(o.double(), _brute(q, k, v, include_current, kpm), atol=1e-5, rtol=1e-5)


CASES = [
    # B, Hq, Hk, Tq, Tk, d, block_q, block_k, padded
    (1, 1, 1, 1, 1, 4, 4, 4, False),
    (2, 2, 2, 17, 17, 8, 4, 8, True),
    (1, 4, 2, 67, 67, 5, 16, 8, False),
    (2, 2, 1, 67, 67, 8, 32, 32, True),
    (2, 2, 2, 1, 67, 8, 16, 16, True),  # decode step
    (1, 3, 1, 5, 17, 3, 2, 4, True),  # Tq < Tk, GQA 3:1
]


@pytest.mark.parametrize("include_current", [True, False])
@pytest.mark.parametrize("case", CASES)
def test_blockwise_matches_reference(case, include_current):
    B, Hq, Hk, Tq, Tk, d, bq, bk, padded = case
    g = torch.Generator().manual_seed(hash(case) % 1000)
    q = torch.randn(B, Hq, Tq, d, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, Hk, Tk, d, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, Hk, Tk, d, generator=g, dtype=torch.float64, requires_grad=True)
    kpm = (torch.rand(B, Tk, generator=g) > 0.3) if padded else None
    do = torch.randn(B, Hq, Tq, d, generator=g, dtype=torch.float64)
    o_ref = stickbreaking_reference(q, k, v, include_current=include_current, key_padding_mask=kpm)
    g_ref = torch.autograd.grad(o_ref, (q, k, v), do)
    o = stickbreaking_blockwise(q, k, v, include_current=include_current, key_padding_mask=kpm, block_q=bq, block_k=bk)
    grads = torch.autograd.grad(o, (q, k, v), do)
    torch.testing.assert_close(o.double(), o_ref.double(), atol=2e-6, rtol=1e-5)
    for name, a, b in zip("qkv", grads, g_ref):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=f"d{name}")


def test_shared_kv_and_public_entry(monkeypatch):
    """MoLM passes the same tensor as k and v; gradients must add up. Public op on CPU."""
    monkeypatch.setenv("MOLM_DS_KERNELS", "torch")
    torch.manual_seed(1)
    q = torch.randn(2, 2, 9, 6, requires_grad=True)
    kv = torch.randn(2, 2, 9, 6, requires_grad=True)
    o = stickbreaking_attention(q, kv, kv)
    gq, gkv = torch.autograd.grad(o.square().sum(), (q, kv))
    o_ref = stickbreaking_reference(q, kv, kv)
    gq_ref, gkv_ref = torch.autograd.grad(o_ref.square().sum(), (q, kv))
    torch.testing.assert_close(o, o_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gq, gq_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gkv, gkv_ref, atol=1e-4, rtol=1e-4)


def test_bf16_output_dtype():
    q = torch.randn(1, 1, 5, 4, dtype=torch.bfloat16)
    assert stickbreaking_attention(q, q, q).dtype == torch.bfloat16


def test_bad_inputs_are_clear():
    q = torch.randn(1, 3, 4, 8)
    with pytest.raises(ValueError, match="does not fit"):
        stickbreaking_attention(q, torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8))
    with pytest.raises(ValueError, match="key_padding_mask"):
        stickbreaking_attention(q, q, q, key_padding_mask=torch.ones(1, 5, dtype=torch.bool))


def test_bad_backend_switch(monkeypatch):
    monkeypatch.setenv("MOLM_DS_KERNELS", "cuda")
    with pytest.raises(ValueError, match="MOLM_DS_KERNELS"):
        stickbreaking_attention(torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4))


@pytest.mark.parametrize("include_current", [True, False])
def test_op_passes_opcheck(include_current):
    """Schema, fake implementation, autograd registration and AOT dispatch of molm_ds::stickbreaking."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 6, 4, generator=g, requires_grad=True)
    k = torch.randn(1, 1, 7, 4, generator=g, requires_grad=True)
    kpm = torch.tensor([[True, True, False, True, True, True, True]])
    torch.library.opcheck(torch.ops.molm_ds.stickbreaking, (q, k, k, kpm, include_current, 4, 4, False))


@pytest.mark.parametrize("include_current", [True, False])
def test_bf16_gradients_on_the_cpu_path(include_current, monkeypatch):
    """bf16 in, fp32 math inside: the block-wise backward gets the forward's fp32 o (G_i = do_i . o_i from a
    bf16-rounded o would put its rounding into every dz), so gradients are as good as bf16 outputs allow."""
    monkeypatch.setenv("MOLM_DS_KERNELS", "torch")
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 40, 16, generator=g).bfloat16().requires_grad_() for _ in range(3))
    do = torch.randn(1, 2, 40, 16, generator=g).bfloat16()
    o = stickbreaking_attention(q, k, v, include_current=include_current)
    ref_in = [t.detach().float().requires_grad_() for t in (q, k, v)]
    o_ref = stickbreaking_reference(*ref_in, include_current=include_current)
    got = torch.autograd.grad(o, (q, k, v), do)
    want = torch.autograd.grad(o_ref, ref_in, do.float())
    for name, a, b in zip("qkv", got, want):
        rel = (a.float() - b).norm() / b.norm()
        assert a.dtype == torch.bfloat16 and rel < 8e-3, (name, rel)
