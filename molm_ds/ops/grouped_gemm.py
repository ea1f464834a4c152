"""Grouped expert GEMM on rows that are already grouped by expert.

Legend: N = rows (token-expert pairs), E = experts, I = input width, O = output width.
`x_NI` holds the rows of expert 0 first, then expert 1, ...; `counts_E[e]` rows belong to expert e.

Paths (picked by `molm_ds.ops.backend`, env `MOLM_DS_KERNELS`): the Triton scattered GEMM
(`kernels.grouped_gemm`) for CUDA tensors, otherwise `_GroupedGemmLoop`, a custom autograd Function
that runs one `mm` per expert straight into the output (no cat, no padding) and writes the backward
by hand (dX_e = dY_e W_e^T, dW_e = X_e^T dY_e). On this CPU build it is as fast as
`torch._grouped_mm`, which needs 16-byte aligned strides and whose backward failed here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from molm_ds.ops.backend import use_triton


def _check(x_NI: Tensor, w_EIO: Tensor, counts_E: Tensor) -> list[int]:
    if x_NI.dim() != 2 or w_EIO.dim() != 3 or x_NI.shape[1] != w_EIO.shape[1]:
        raise ValueError(f"grouped_gemm: x {tuple(x_NI.shape)} and w {tuple(w_EIO.shape)} do not fit (need x [N, I], w [E, I, O])")
    if counts_E.dim() != 1 or counts_E.shape[0] != w_EIO.shape[0]:
        raise ValueError(f"grouped_gemm: counts {tuple(counts_E.shape)} must be [E] with E = {w_EIO.shape[0]} experts")
    counts = [int(c) for c in counts_E.tolist()]
    if sum(counts) != x_NI.shape[0] or min(counts, default=0) < 0:
        raise ValueError(f"grouped_gemm: counts sum to {sum(counts)} but x has {x_NI.shape[0]} rows")
    return counts


def grouped_gemm_reference(x_NI: Tensor, w_EIO: Tensor, counts_E: Tensor) -> Tensor:
    """Readable loop: y[rows of e] = x[rows of e] @ w[e]."""
    if x_NI.dim() != 2 or w_EIO.dim() != 3 or x_NI.shape[1] != w_EIO.shape[1]:
        raise ValueError(f"grouped_gemm: x {tuple(x_NI.shape)} and w {tuple(w_EIO.shape)} do not fit")
    outs = []
    start = 0
    for e, n in enumerate(counts_E.tolist()):
        outs.append(x_NI[start : start + n] @ w_EIO[e])
        start += n
    if start != x_NI.shape[0]:
        raise ValueError(f"grouped_gemm: counts sum to {start} but x has {x_NI.shape[0]} rows")
    if not outs:
        return x_NI.new_zeros(0, w_EIO.shape[2])
    return torch.cat(outs, dim=0)


def _mm_groups(a_NI: Tensor, b_EIO: Tensor, counts: list[int], transpose_b: bool) -> Tensor:
    out = a_NI.new_empty(a_NI.shape[0], b_EIO.shape[1] if transpose_b else b_EIO.shape[2])
    s = 0
    for e, n in enumerate(counts):
        if n:
            torch.mm(a_NI[s : s + n], b_EIO[e].t() if transpose_b else b_EIO[e], out=out[s : s + n])
        s += n
    return out


class _GroupedGemmLoop(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_NI: Tensor, w_EIO: Tensor, counts: list[int]) -> Tensor:
        dt = torch.promote_types(x_NI.dtype, w_EIO.dtype)
        x_NI, w_EIO = x_NI.to(dt), w_EIO.to(dt)
        ctx.save_for_backward(x_NI, w_EIO)
        ctx.counts = counts
        return _mm_groups(x_NI.contiguous(), w_EIO, counts, transpose_b=False)

    @staticmethod
    def backward(ctx, dy_NO: Tensor):
        x_NI, w_EIO = ctx.saved_tensors
        counts = ctx.counts
        dy_NO = dy_NO.contiguous()
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = _mm_groups(dy_NO, w_EIO, counts, transpose_b=True)
        if ctx.needs_input_grad[1]:
            dw = torch.empty_like(w_EIO)
            s = 0
            for e, n in enumerate(counts):
                if n:
                    torch.mm(x_NI[s : s + n].t(), dy_NO[s : s + n], out=dw[e])
                else:
                    dw[e].zero_()  # an expert with no rows gets a zero gradient
                s += n
        return dx, dw, None


def grouped_gemm(x_NI: Tensor, w_EIO: Tensor, counts_E: Tensor) -> Tensor:
    """y_NO[rows of e] = x_NI[rows of e] @ w_EIO[e]; differentiable in x and w.

    Triton on CUDA (under MOLM_DS_KERNELS=auto|triton), the per-expert loop otherwise.
    """
    if use_triton(x_NI):
        from kernels.grouped_gemm import grouped_gemm_triton

        _check(x_NI, w_EIO, counts_E)
        return grouped_gemm_triton(x_NI, w_EIO, counts_E)
    counts = _check(x_NI, w_EIO, counts_E)
    return _GroupedGemmLoop.apply(x_NI, w_EIO, counts)
