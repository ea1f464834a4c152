"""Grouped expert GEMM on rows that are already grouped by expert.

Legend: N = rows (token-expert pairs), E = experts, I = input width, O = output width.
`x_NI` holds the rows of expert 0 first, then expert 1, ...; `counts_E[e]` rows belong to expert e.
Counts are an int64 tensor [E], a list, or a `GroupCounts` (tensor + host list made once and shared).

Paths (picked by `molm_ds.ops.backend`, env `MOLM_DS_KERNELS`): the Triton scattered GEMM
(`kernels.grouped_gemm`) for CUDA tensors, otherwise `_GroupedGemmLoop`, a custom autograd Function
that runs one `mm` per expert straight into the output (no cat, no padding) and writes the backward
by hand (dX_e = dY_e W_e^T, dW_e = X_e^T dY_e). On this CPU build it is as fast as
`torch._grouped_mm`, which needs 16-byte aligned strides and whose backward failed here.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from molm_ds.errors import debug_enabled
from molm_ds.ops.backend import use_triton


class GroupCounts:
    """Rows per expert of a grouped batch: the device tensor the Triton kernels read, and the host list
    the per-expert loop slices with. The host list is made once, on first use (a host sync when the
    tensor lives on a GPU), and shared by every GEMM of the layer that holds this object; a dispatcher
    that already has the counts on the host (the all-to-all split sizes) passes them in."""

    __slots__ = ("tensor", "_host")

    def __init__(self, tensor: Tensor, host: Optional[list] = None) -> None:
        self.tensor = tensor
        self._host = None if host is None else [int(c) for c in host]

    def host(self) -> list:
        if self._host is None:
            self._host = [int(c) for c in self.tensor.tolist()]  # host sync: only the per-expert loop asks
        return self._host

    @classmethod
    def of(cls, counts) -> "GroupCounts":
        if isinstance(counts, GroupCounts):
            return counts
        if isinstance(counts, Tensor):
            return cls(counts)
        return cls(torch.tensor(list(counts), dtype=torch.int64), list(counts))

    def __repr__(self) -> str:
        return f"GroupCounts({self._host if self._host is not None else tuple(self.tensor.shape)})"


def _check_shapes(x_NI: Tensor, w_EIO: Tensor, counts: GroupCounts) -> None:
    """Shape checks (free). The counts' values are checked where they are on the host anyway (the loop
    path) or, under MOLM_DS_DEBUG=1, on the Triton path."""
    if x_NI.dim() != 2 or w_EIO.dim() != 3 or x_NI.shape[1] != w_EIO.shape[1]:
        raise ValueError(f"grouped_gemm: x {tuple(x_NI.shape)} and w {tuple(w_EIO.shape)} do not fit (need x [N, I], w [E, I, O])")
    if counts.tensor.dim() != 1 or counts.tensor.shape[0] != w_EIO.shape[0]:
        raise ValueError(f"grouped_gemm: counts {tuple(counts.tensor.shape)} must be [E] with E = {w_EIO.shape[0]} experts")


def _check_values(x_NI: Tensor, counts: list) -> None:
    if sum(counts) != x_NI.shape[0] or min(counts, default=0) < 0:
        raise ValueError(f"grouped_gemm: counts sum to {sum(counts)} but x has {x_NI.shape[0]} rows (counts {counts})")


def _host_counts(x_NI: Tensor, w_EIO: Tensor, counts) -> list:
    counts = GroupCounts.of(counts)
    _check_shapes(x_NI, w_EIO, counts)
    host = counts.host()
    _check_values(x_NI, host)
    return host


def _triton_counts(x_NI: Tensor, w_EIO: Tensor, counts) -> Tensor:
    counts = GroupCounts.of(counts)
    _check_shapes(x_NI, w_EIO, counts)
    if debug_enabled():
        _check_values(x_NI, counts.host())
    return counts.tensor


def grouped_gemm_reference(x_NI: Tensor, w_EIO: Tensor, counts_E) -> Tensor:
    """Readable loop: y[rows of e] = x[rows of e] @ w[e]."""
    if x_NI.dim() != 2 or w_EIO.dim() != 3 or x_NI.shape[1] != w_EIO.shape[1]:
        raise ValueError(f"grouped_gemm: x {tuple(x_NI.shape)} and w {tuple(w_EIO.shape)} do not fit")
    outs = []
    start = 0
    for e, n in enumerate(GroupCounts.of(counts_E).host()):
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


def grouped_gemm(x_NI: Tensor, w_EIO: Tensor, counts_E) -> Tensor:
    """y_NO[rows of e] = x_NI[rows of e] @ w_EIO[e]; differentiable in x and w.

    Triton on CUDA (under MOLM_DS_KERNELS=auto|triton), the per-expert loop otherwise.
    """
    if use_triton(x_NI):
        from kernels.grouped_gemm import grouped_gemm_triton

        return grouped_gemm_triton(x_NI, w_EIO, _triton_counts(x_NI, w_EIO, counts_E))
    return _GroupedGemmLoop.apply(x_NI, w_EIO, _host_counts(x_NI, w_EIO, counts_E))


def grouped_mlp_reference(x_NI: Tensor, w1_EIH: Tensor, w2_EHO: Tensor, counts_E) -> Tensor:
    """Readable loop: y[rows of e] = gelu_tanh(x[rows of e] @ w1[e]) @ w2[e]."""
    h = grouped_gemm_reference(x_NI, w1_EIH, counts_E)
    return grouped_gemm_reference(torch.nn.functional.gelu(h, approximate="tanh"), w2_EHO, counts_E)


class _GroupedMLPLoop(torch.autograd.Function):
    """Whole expert MLP (x -> w1 -> gelu_tanh -> w2) as one Function: per-expert `mm` into
    preallocated outputs, saves x, h (pre-activation) and a = gelu(h), nothing else."""

    @staticmethod
    def forward(ctx, x_NI: Tensor, w1_EIH: Tensor, w2_EHO: Tensor, counts: list[int]) -> Tensor:
        dt = torch.promote_types(torch.promote_types(x_NI.dtype, w1_EIH.dtype), w2_EHO.dtype)
        x_NI, w1_EIH, w2_EHO = x_NI.to(dt).contiguous(), w1_EIH.to(dt), w2_EHO.to(dt)
        h_NH = _mm_groups(x_NI, w1_EIH, counts, transpose_b=False)
        a_NH = torch.nn.functional.gelu(h_NH, approximate="tanh")
        ctx.save_for_backward(x_NI, w1_EIH, w2_EHO, h_NH, a_NH)
        ctx.counts = counts
        return _mm_groups(a_NH, w2_EHO, counts, transpose_b=False)

    @staticmethod
    def backward(ctx, dy_NO: Tensor):
        x_NI, w1_EIH, w2_EHO, h_NH, a_NH = ctx.saved_tensors
        counts = ctx.counts
        dy_NO = dy_NO.contiguous()
        need_x, need_w1, need_w2 = ctx.needs_input_grad[:3]
        dw1 = torch.empty_like(w1_EIH) if need_w1 else None
        dw2 = torch.empty_like(w2_EHO) if need_w2 else None
        da_NH = h_NH.new_empty(h_NH.shape)
        s = 0
        for e, n in enumerate(counts):
            if n:
                rows = slice(s, s + n)
                torch.mm(dy_NO[rows], w2_EHO[e].t(), out=da_NH[rows])
                if need_w2:
                    torch.mm(a_NH[rows].t(), dy_NO[rows], out=dw2[e])
            elif need_w2:
                dw2[e].zero_()
            s += n
        # dh = gelu'(h) * da, written over da (elementwise, same shape: aliasing is safe)
        dh_NH = torch.ops.aten.gelu_backward.grad_input(da_NH, h_NH, approximate="tanh", grad_input=da_NH)
        dx = _mm_groups(dh_NH, w1_EIH, counts, transpose_b=True) if need_x else None
        if need_w1:
            s = 0
            for e, n in enumerate(counts):
                if n:
                    torch.mm(x_NI[s : s + n].t(), dh_NH[s : s + n], out=dw1[e])
                else:
                    dw1[e].zero_()
                s += n
        return dx, dw1, dw2, None


def grouped_mlp(x_NI: Tensor, w1_EIH: Tensor, w2_EHO: Tensor, counts_E) -> Tensor:
    """y_NO[rows of e] = gelu_tanh(x_NI[rows of e] @ w1[e]) @ w2[e]; differentiable in x, w1, w2.

    One autograd Function on the PyTorch path (`_GroupedMLPLoop`); on the Triton path two
    `grouped_gemm` calls around the activation.
    """
    if w1_EIH.dim() != 3 or w2_EHO.dim() != 3 or w1_EIH.shape[0] != w2_EHO.shape[0] or w1_EIH.shape[2] != w2_EHO.shape[1]:
        raise ValueError(f"grouped_mlp: w1 {tuple(w1_EIH.shape)} and w2 {tuple(w2_EHO.shape)} do not fit (need [E, I, H] and [E, H, O])")
    if use_triton(x_NI):
        h = grouped_gemm(x_NI, w1_EIH, counts_E)
        return grouped_gemm(torch.nn.functional.gelu(h, approximate="tanh"), w2_EHO, counts_E)
    return _GroupedMLPLoop.apply(x_NI, w1_EIH, w2_EHO, _host_counts(x_NI, w1_EIH, counts_E))
