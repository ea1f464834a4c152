"""Tuned parts of the block-wise stick-breaking path: chunked suffix sums, full-width key blocks
(block 64/128, where chunking is used), and the clamped exp (log-weights far below fp32 underflow)."""

import pytest
import torch

from molm_ds.ops import stickbreaking_reference
from molm_ds.ops.stickbreaking_cpu import _Suffix, stickbreaking_blockwise


@pytest.mark.parametrize("n,c", [(128, 32), (64, 16), (96, 32), (8, 32), (48, 5)])
def test_suffix_sums_match_flip_cumsum(n, c):
    x = torch.randn(3, 7, n, dtype=torch.float64)
    want = torch.flip(torch.cumsum(torch.flip(x, [-1]), -1), [-1])
    suffix = _Suffix(n, x.device, x.dtype, c=c)
    torch.testing.assert_close(suffix(x), want)
    torch.testing.assert_close(suffix(x[..., : n - 3]), torch.flip(torch.cumsum(torch.flip(x[..., : n - 3], [-1]), -1), [-1]))


@pytest.mark.parametrize("include_current", [True, False])
@pytest.mark.parametrize("T,bq,bk,padded", [(150, 64, 64, True), (200, 128, 128, False), (130, 32, 64, True)])
def test_full_width_blocks_match_reference(T, bq, bk, padded, include_current):
    g = torch.Generator().manual_seed(T + bk)
    q, k, v = (torch.randn(2, 2, T, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    kpm = (torch.rand(2, T, generator=g) > 0.2) if padded else None
    do = torch.randn(2, 2, T, 8, generator=g, dtype=torch.float64)
    o_ref = stickbreaking_reference(q, k, v, include_current=include_current, key_padding_mask=kpm)
    o = stickbreaking_blockwise(q, k, v, include_current=include_current, key_padding_mask=kpm, block_q=bq, block_k=bk)
    # the reference computes in fp32 (q.float()), hence fp32-level tolerances
    torch.testing.assert_close(o.double(), o_ref.double(), atol=2e-6, rtol=1e-5)
    for name, a, b in zip("qkv", torch.autograd.grad(o, (q, k, v), do), torch.autograd.grad(o_ref, (q, k, v), do)):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=f"d{name}")


def test_underflowing_weights_fp32_match_fp64_reference():
    # large logits: most log A_ij lie far below -87 (the fp32 underflow the clamp guards against)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 300, 16, generator=g) * s for s in (4.0, 4.0, 1.0))
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    o_ref = stickbreaking_reference(q64, k64, v64)
    log_a_min = -torch.nn.functional.softplus(q64 @ k64.transpose(-1, -2) / 4).tril().sum(-1).max()
    assert log_a_min < -87  # the regime under test is reached
    o = stickbreaking_blockwise(q, k, v, block_q=64, block_k=64)
    torch.testing.assert_close(o.double(), o_ref, atol=1e-5, rtol=1e-4)
    do = torch.randn(o.shape, generator=g)
    got = torch.autograd.grad(o, (q, k, v), do)
    want = torch.autograd.grad(o_ref, (q64, k64, v64), do.double())
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, atol=1e-4, rtol=1e-3)


def _count_tiles(monkeypatch):
    import molm_ds.ops.stickbreaking_cpu as sb

    calls = []
    real = sb._tile_logits

    def counting(*args):
        calls.append(args[3])  # ks: the key tile's start
        return real(*args)

    monkeypatch.setattr(sb, "_tile_logits", counting)
    return calls


@pytest.mark.parametrize("include_current", [True, False])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("long_stick", [False, True])
def test_early_exit_matches_reference_and_skips_only_spent_sticks(monkeypatch, include_current, padded, long_stick):
    """Random logits spend each row's stick within a few dozen keys: the far key tiles are skipped (fewer
    tiles visited than the causal triangle has) and outputs and gradients still match the reference.
    With every logit ~ -8 the stick lasts the whole sequence and every tile is visited."""
    T, bq, bk, d = 256, 16, 16, 8
    g = torch.Generator().manual_seed(3 + padded)
    q, k, v = (torch.randn(2, 2, T, d, generator=g, dtype=torch.float64) for _ in range(3))
    q, k = q * 2.0, k * 2.0  # logits ~ N(0, 8): the stick is spent within ~20 keys
    if long_stick:
        c = (8.0 * d**0.5) ** 0.5
        q[..., 0], k[..., 0] = c, -c  # q.k / sqrt(d) ~ -8 - (a little noise from the other dims)
        q[..., 1:], k[..., 1:] = q[..., 1:] / 2.0, k[..., 1:] / 2.0
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    kpm = (torch.rand(2, T, generator=g) > 0.2) if padded else None
    do = torch.randn(2, 2, T, d, generator=g, dtype=torch.float64)
    o_ref = stickbreaking_reference(q, k, v, include_current=include_current, key_padding_mask=kpm)
    calls = _count_tiles(monkeypatch)
    o = stickbreaking_blockwise(q, k, v, include_current=include_current, key_padding_mask=kpm, block_q=bq, block_k=bk)
    forward_tiles = len(calls)
    got = torch.autograd.grad(o, (q, k, v), do)
    backward_tiles = len(calls) - forward_tiles
    n_blocks = T // bq
    all_tiles = n_blocks * (n_blocks + 1) // 2  # the causal triangle of tiles (include_current)
    if not include_current:
        all_tiles = sum(len(range(0, qs + bq - 1, bk)) for qs in range(0, T, bq))
    if long_stick:
        assert forward_tiles == backward_tiles == all_tiles
    else:
        assert forward_tiles == backward_tiles and forward_tiles < 0.6 * all_tiles, (forward_tiles, all_tiles)
    torch.testing.assert_close(o.double(), o_ref.double(), atol=2e-6, rtol=1e-5)
    want = torch.autograd.grad(o_ref, (q, k, v), do)
    for name, a, b in zip("qkv", got, want):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=f"d{name}")
