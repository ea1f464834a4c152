"""The compiled Triton kernels on a CUDA GPU (``pytest -m gpu``; skipped without CUDA): outputs and
gradients against the references in bf16 (relative error ||a - b|| / ||b|| against fp32 math on the same
bf16 inputs) and fp32, bitwise-repeatable backward, the layers against their PyTorch paths.
``scripts/gpu_check.sh`` runs these first, then the larger shapes of ``scripts/gpu_check.py``."""

import math

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

BF16_REL = 1e-2


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _routing(T, K, E, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    probs = torch.softmax(torch.randn(T, E, device="cuda", generator=g), -1)
    gates, idx = probs.topk(K, dim=-1)
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    return gates, order, torch.bincount(flat, minlength=E)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, BF16_REL), (torch.float32, 1e-5)])
def test_mlp_experts_fused_path(dtype, tol):
    from molm_ds.ops import grouped_gemm, grouped_gemm_gated, grouped_gemm_gated_reference, grouped_gemm_reference

    T, K, E, D, H = 2048, 2, 8, 512, 1024
    gates, order, counts = _routing(T, K, E, 0)
    x = torch.randn(T, D, device="cuda").to(dtype).requires_grad_()
    w1 = (torch.randn(E, D, H, device="cuda") / math.sqrt(D)).to(dtype).requires_grad_()
    w2 = (torch.randn(E, H, D, device="cuda") / math.sqrt(H)).to(dtype).requires_grad_()
    g = gates.clone().requires_grad_()
    ins = (x, w1, w2, g)

    def ours(x, w1, w2, g):
        h = grouped_gemm(x, w1, counts, src_N=order, fan_in=K)
        return grouped_gemm_gated(torch.nn.functional.gelu(h, approximate="tanh"), w2, counts, g, order)

    def ref(x, w1, w2, g):
        h = grouped_gemm_reference(x, w1, counts, src_N=order, fan_in=K)
        return grouped_gemm_gated_reference(torch.nn.functional.gelu(h, approximate="tanh"), w2, counts, g, order)

    ref_in = [t.detach().float().requires_grad_() for t in ins]
    y, y_ref = ours(*ins), ref(*ref_in)
    dy = torch.randn_like(y_ref)
    assert _rel(y, y_ref) < tol
    for name, a, b in zip(["x", "w1", "w2", "gates"], torch.autograd.grad(y, ins, dy.to(y.dtype)),
                          torch.autograd.grad(y_ref, ref_in, dy)):
        assert _rel(a, b) < tol, name


@pytest.mark.parametrize("include_current", [True, False])
@pytest.mark.parametrize("B,Hq,Hk,T,d", [(2, 4, 2, 1024, 64), (1, 2, 1, 512, 1024), (1, 1, 1, 300, 96)])
def test_stickbreaking_bf16(B, Hq, Hk, T, d, include_current):
    from molm_ds.ops import stickbreaking_attention, stickbreaking_reference

    torch.manual_seed(0)
    q = torch.randn(B, Hq, T, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B, Hk, T, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(B, Hk, T, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    kpm = torch.rand(B, T, device="cuda") > 0.1
    do = torch.randn(B, Hq, T, d, device="cuda", dtype=torch.bfloat16)
    o = stickbreaking_attention(q, k, v, include_current=include_current, key_padding_mask=kpm)
    ref_in = [t.detach().float().requires_grad_() for t in (q, k, v)]
    o_ref = stickbreaking_reference(*ref_in, include_current=include_current, key_padding_mask=kpm)
    assert _rel(o, o_ref) < BF16_REL
    for name, a, b in zip("qkv", torch.autograd.grad(o, (q, k, v), do), torch.autograd.grad(o_ref, ref_in, do.float())):
        assert torch.isfinite(a).all() and _rel(a, b) < BF16_REL, name


def test_stickbreaking_fp32_and_repeatable_backward():
    from molm_ds.ops import stickbreaking_attention, stickbreaking_reference

    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 4, 700, 64, device="cuda", requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)
    o = stickbreaking_attention(q, k, v, include_current=False)
    o_ref = stickbreaking_reference(q, k, v, include_current=False)
    assert _rel(o, o_ref) < 1e-5
    first = torch.autograd.grad(o, (q, k, v), do)
    for a, b in zip(first, torch.autograd.grad(o_ref, (q, k, v), do)):
        assert _rel(a, b) < 1e-4
    o2 = stickbreaking_attention(q, k, v, include_current=False)
    for a, b in zip(first, torch.autograd.grad(o2, (q, k, v), do)):
        assert torch.equal(a, b), "the backward has no atomics: two runs give the same bytes"


def test_decode_kernel():
    from molm_ds.ops import stickbreaking_attention, stickbreaking_reference

    q = torch.randn(2, 4, 1, 1024, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, 2, 333, 1024, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        o = stickbreaking_attention(q, k, k)
    assert _rel(o, stickbreaking_reference(q.float(), k.float(), k.float())) < BF16_REL


@pytest.mark.parametrize("kind", ["mlp", "attention"])
def test_layers_against_their_pytorch_paths(kind, monkeypatch):
    from molm_ds.config import ModelConfig
    from molm_ds.model import MixtureOfAttention, MoEMLP

    torch.manual_seed(2)
    cfg = ModelConfig(vocab_size=11, n_layer=1, d_model=256, n_att_experts=8, k_att=2, att_hidden=256, n_head=1,
                      n_mlp_experts=8, k_mlp=2, ffd_hidden=512, gating_size=64)
    layer = (MoEMLP(cfg) if kind == "mlp" else MixtureOfAttention(cfg)).cuda().to(torch.bfloat16)
    x = torch.randn(2, 512, 256, device="cuda", dtype=torch.bfloat16)
    outs = {}
    for backend in ("triton", "torch"):
        monkeypatch.setenv("MOLM_DS_KERNELS", backend)
        xi = x.clone().requires_grad_()
        y = layer(xi)[0]
        outs[backend] = (y.float(), torch.autograd.grad(y.float().square().sum(), [xi, *layer.parameters()]))
    assert _rel(outs["triton"][0], outs["torch"][0]) < 2e-2
    for (name, _), a, b in zip([("x", None), *layer.named_parameters()], outs["triton"][1], outs["torch"][1]):
        assert _rel(a, b) < 3e-2, name
