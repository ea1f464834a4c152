"""The Triton stick-breaking kernels under the interpreter (tiles of 16 queries x 16 keys, head dims
contracted 32 at a time in 32-wide output slices) against the reference: outputs and all gradients;
the early exit in the forward and both backward passes; bitwise-repeatable backward; bf16."""

import inspect
import math

import pytest
import torch

from molm_ds.ops import stickbreaking_attention, stickbreaking_reference
from molm_ds.ops.stickbreaking_cpu import EXIT_LOG_STICK

CASES = [
    # B, Hq, Hk, Tq, Tk, d, padded
    (1, 1, 1, 1, 1, 4, False),
    (2, 2, 1, 17, 17, 8, True),  # two query heads per key head, padding keys
    (1, 2, 2, 5, 67, 5, True),  # Tq < Tk (queries at the end), odd head dim
    (1, 1, 1, 33, 33, 40, False),  # head dim over two contraction chunks and two output slices
]


def _inputs(B, Hq, Hk, Tq, Tk, d, padded, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, Hq, Tq, d, generator=g) * scale).requires_grad_()
    k = (torch.randn(B, Hk, Tk, d, generator=g) * scale).requires_grad_()
    v = torch.randn(B, Hk, Tk, d, generator=g, requires_grad=True)
    kpm = (torch.rand(B, Tk, generator=g) > 0.3) if padded else None
    do = torch.randn(B, Hq, Tq, d, generator=g)
    return q, k, v, kpm, do


def _check(q, k, v, kpm, do, include_current, atol=1e-5, gtol=1e-4):
    o = stickbreaking_attention(q, k, v, include_current=include_current, key_padding_mask=kpm)
    o_ref = stickbreaking_reference(*(t.double() for t in (q, k, v)), include_current=include_current, key_padding_mask=kpm)
    torch.testing.assert_close(o.double(), o_ref, atol=atol, rtol=atol)
    got = torch.autograd.grad(o, (q, k, v), do)
    want = torch.autograd.grad(o_ref, (q, k, v), do.double())
    for name, a, b in zip("qkv", got, want):
        assert torch.isfinite(a).all(), f"d{name} not finite"
        torch.testing.assert_close(a.double(), b.double(), atol=gtol, rtol=gtol, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("include_current", [True, False])
@pytest.mark.parametrize("case", CASES)
def test_matches_reference(case, include_current):
    _check(*_inputs(*case, seed=sum(case)), include_current)


def _stop(q, k, v, include_current):
    from molm_ds.kernels.stickbreaking import launch

    _, _, stop = launch.forward(q.detach(), k.detach(), v.detach(), None, include_current, EXIT_LOG_STICK)
    return stop


@pytest.mark.parametrize("include_current", [True, False])
def test_early_exit_skips_spent_sticks_and_matches(include_current):
    """Logits ~ N(0, 16): every row's stick is spent within a few keys, so query blocks far from the
    start stop before key block 0 (stop > 0); the skipped tiles change nothing measurable."""
    q, k, v, _, do = _inputs(1, 1, 1, 96, 96, 8, False, seed=5, scale=2.0)
    stop = _stop(q, k, v, include_current)
    assert int(stop[:, -1].min()) > 0 and int(stop[:, 0].max()) == 0, stop  # the last blocks exit early
    _check(q, k, v, None, do, include_current)


@pytest.mark.parametrize("include_current", [True, False])
def test_long_stick_visits_every_tile(include_current):
    """Every logit ~ -8: sigmoid ~ 3e-4, the stick lasts the whole sequence, no tile is skipped."""
    q, k, v, _, do = _inputs(1, 1, 1, 64, 64, 8, False, seed=6)
    c = (8.0 * math.sqrt(8)) ** 0.5
    with torch.no_grad():
        q[..., 0], k[..., 0] = c, -c
    assert int(_stop(q, k, v, include_current).max()) == 0
    _check(q, k, v, None, do, include_current)


@pytest.mark.parametrize("include_current", [True, False])
def test_backward_is_bitwise_repeatable(include_current):
    q, k, v, kpm, do = _inputs(1, 2, 1, 33, 33, 8, True, seed=9, scale=1.5)

    def grads():
        o = stickbreaking_attention(q, k, v, include_current=include_current, key_padding_mask=kpm)
        return torch.autograd.grad(o, (q, k, v), do)

    for a, b in zip(grads(), grads()):
        assert torch.equal(a, b)


def test_prefix_sums_keep_fp32_accuracy_over_many_tiles():
    """13 key tiles of carried log-stick: the fp32 scan + carry stays at fp32 accuracy (vs fp64)."""
    q, k, v, _, do = _inputs(1, 1, 1, 200, 200, 16, False, seed=2)
    with torch.no_grad():  # long sticks: every tile of every row counts
        q[..., 0], k[..., 0] = 6.0, -6.0
    o = stickbreaking_attention(q, k, v)
    o64 = stickbreaking_reference(q.double(), k.double(), v.double())
    err = (o.double() - o64).norm() / o64.norm()
    assert err < 1e-6, err


def test_fully_masked_rows_are_zero_without_nan():
    q = torch.randn(1, 1, 5, 8, requires_grad=True)
    k = torch.randn(1, 1, 5, 8, requires_grad=True)
    kpm = torch.zeros(1, 5, dtype=torch.bool)
    o = stickbreaking_attention(q, k, k, key_padding_mask=kpm)
    gq, gk = torch.autograd.grad(o.sum(), (q, k))
    assert torch.all(o == 0) and torch.all(gq == 0) and torch.isfinite(gk).all()


@pytest.mark.parametrize("include_current", [True, False])
def test_decode_matches_last_row(include_current):
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 4, 1, 8, generator=g), torch.randn(2, 2, 67, 8, generator=g)
    kpm = torch.rand(2, 67, generator=g) > 0.2
    with torch.no_grad():
        o = stickbreaking_attention(q, k, k, include_current=include_current, key_padding_mask=kpm)
    o_ref = stickbreaking_reference(q, k, k, include_current=include_current, key_padding_mask=kpm)
    torch.testing.assert_close(o, o_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("include_current", [True, False])
def test_bf16_against_fp32_reference(include_current):
    q, k, v, kpm, do = _inputs(1, 2, 1, 33, 33, 16, True, seed=4)
    qb, kb, vb = (t.detach().bfloat16().requires_grad_() for t in (q, k, v))
    o = stickbreaking_attention(qb, kb, vb, include_current=include_current, key_padding_mask=kpm)
    assert o.dtype == torch.bfloat16
    ref_in = [t.detach().bfloat16().float().requires_grad_() for t in (q, k, v)]
    o_ref = stickbreaking_reference(*ref_in, include_current=include_current, key_padding_mask=kpm)
    rel = (o.float() - o_ref).norm() / o_ref.norm()
    assert rel < 1e-2, rel
    got = torch.autograd.grad(o, (qb, kb, vb), do.bfloat16())
    want = torch.autograd.grad(o_ref, ref_in, do.bfloat16().float())
    for name, a, b in zip("qkv", got, want):
        rel = (a.float() - b).norm() / b.norm()
        assert rel < 1e-2, (name, rel)


def test_no_atomics_or_locks_in_the_kernels():
    from molm_ds.kernels.stickbreaking import launch

    src = inspect.getsource(launch)
    assert "tl.atomic" not in src, "every dq/dk/dv element has one writer"


def test_triton_ops_pass_opcheck():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 6, 4, generator=g, requires_grad=True)
    k = torch.randn(1, 1, 7, 4, generator=g, requires_grad=True)
    torch.library.opcheck(torch.ops.molm_ds.stickbreaking, (q, k, k, None, False, 4, 4, True))
    torch.library.opcheck(torch.ops.molm_ds.stickbreaking_decode, (q[:, :, :1].detach(), k.detach(), k.detach(), None, True))
