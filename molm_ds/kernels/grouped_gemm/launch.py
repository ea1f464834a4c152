"""Scattered grouped expert GEMM in Triton: the kernels and their launchers.

Legend: N grouped rows (row p belongs to expert e(p); all rows of expert 0 first, then expert 1, ...),
E experts, I/O the GEMM's in/out width, F a fan-in (slots per token). ``counts_E[e]`` rows belong to
expert e; the kernels read the counts on the device and find their rows themselves, so a launch needs
no host sync and no schedule tensors.

    _scatter2scatter_kernel:  Y[dst(p)] = scale(p) * X[src(p) // F] @ W[e(p)]
    _group_dw_kernel:         dW[e] = sum_{p of e} X[xidx(p) // Fx]^T (scale(p) * dY[dyidx(p) // Fdy])

``src`` / ``dst`` / ``xidx`` / ``dyidx`` absent means row p itself (the grouped layout). A program of
the first kernel owns BLOCK_M rows of one expert (blocks never straddle experts) and one BLOCK_N slice of
the output; one of the second owns one expert's [BLOCK_I, BLOCK_O] slice of dW and walks that expert's
rows in order. Every output element is written by exactly one program, with a fixed summation order:
no atomics, so results are bit-identical from run to run.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["group_dw", "scatter2scatter"]


@triton.jit
def _expert_block(COUNTS, E, pid, BLOCK_M: tl.constexpr, E_P2: tl.constexpr):
    """(expert, first row, end row) of program ``pid``'s row block; first >= end for a spare program."""
    er = tl.arange(0, E_P2)
    c = tl.load(COUNTS + er, mask=er < E, other=0).to(tl.int32)
    nblk = (c + BLOCK_M - 1) // BLOCK_M
    blk_end = tl.cumsum(nblk, 0)
    row_end = tl.cumsum(c, 0)
    mine = (blk_end - nblk <= pid) & (pid < blk_end)  # true for at most one expert (none with no rows)
    start = tl.sum(tl.where(mine, row_end - c + (pid - (blk_end - nblk)) * BLOCK_M, 0), 0)
    end = tl.sum(tl.where(mine, row_end, 0), 0)
    e = tl.sum(tl.where(mine, er, 0), 0)
    return e, start, end


@triton.jit
def _scatter2scatter_kernel(
    X, W, Y, SRC, DST, SCALE, COUNTS, E, I, O,
    sxm, sxk, swe, swk, swn, sym, syn,
    FAN_IN: tl.constexpr, HAS_SRC: tl.constexpr, HAS_DST: tl.constexpr, HAS_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, E_P2: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e, start, end = _expert_block(COUNTS, E, pid_m, BLOCK_M, E_P2)
    if start < end:
        rows = start + tl.arange(0, BLOCK_M)
        rmask = rows < end
        if HAS_SRC:
            src = tl.load(SRC + rows, mask=rmask, other=0) // FAN_IN
        else:
            src = rows
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < O
        ks = tl.arange(0, BLOCK_K)
        x_ptrs = X + src[:, None].to(tl.int64) * sxm + ks[None, :] * sxk
        w_ptrs = W + e.to(tl.int64) * swe + ks[:, None] * swk + cols[None, :] * swn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, I, BLOCK_K):
            kmask = (k0 + ks) < I
            x = tl.load(x_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=kmask[:, None] & cmask[None, :], other=0.0)
            acc = tl.dot(x, w, acc, input_precision=PRECISION)
            x_ptrs += BLOCK_K * sxk
            w_ptrs += BLOCK_K * swk
        if HAS_SCALE:
            acc = acc * tl.load(SCALE + rows, mask=rmask, other=0.0).to(tl.float32)[:, None]
        if HAS_DST:
            dst = tl.load(DST + rows, mask=rmask, other=0)
        else:
            dst = rows
        y_ptrs = Y + dst[:, None].to(tl.int64) * sym + cols[None, :] * syn
        tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _group_dw_kernel(
    X, DY, DW, XIDX, DYIDX, SCALE, COUNTS, E, I, O,
    sxm, sxk, sym, syn, swe, swi, swo,
    FAN_X: tl.constexpr, FAN_DY: tl.constexpr, HAS_XIDX: tl.constexpr, HAS_DYIDX: tl.constexpr,
    HAS_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_O: tl.constexpr,
    E_P2: tl.constexpr, PRECISION: tl.constexpr,
):
    e = tl.program_id(0)
    pid = tl.program_id(1)
    n_o = tl.cdiv(O, BLOCK_O)
    ri = (pid // n_o) * BLOCK_I + tl.arange(0, BLOCK_I)
    ro = (pid % n_o) * BLOCK_O + tl.arange(0, BLOCK_O)
    imask = ri < I
    omask = ro < O
    er = tl.arange(0, E_P2)
    c = tl.load(COUNTS + er, mask=er < E, other=0).to(tl.int32)
    end = tl.sum(tl.where(er == e, tl.cumsum(c, 0), 0), 0)
    start = end - tl.sum(tl.where(er == e, c, 0), 0)
    acc = tl.zeros((BLOCK_I, BLOCK_O), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        rmask = rows < end
        if HAS_XIDX:
            xr = tl.load(XIDX + rows, mask=rmask, other=0) // FAN_X
        else:
            xr = rows
        if HAS_DYIDX:
            yr = tl.load(DYIDX + rows, mask=rmask, other=0) // FAN_DY
        else:
            yr = rows
        xt = tl.load(X + xr[None, :].to(tl.int64) * sxm + ri[:, None] * sxk, mask=imask[:, None] & rmask[None, :], other=0.0)
        dy = tl.load(DY + yr[:, None].to(tl.int64) * sym + ro[None, :] * syn, mask=rmask[:, None] & omask[None, :], other=0.0)
        if HAS_SCALE:
            s = tl.load(SCALE + rows, mask=rmask, other=0.0).to(tl.float32)
            dy = (dy.to(tl.float32) * s[:, None]).to(xt.dtype)
        acc = tl.dot(xt, dy, acc, input_precision=PRECISION)
    tl.store(DW + e.to(tl.int64) * swe + ri[:, None] * swi + ro[None, :] * swo, acc.to(DW.dtype.element_ty),
             mask=imask[:, None] & omask[None, :])


def _precision(dtype: torch.dtype) -> str:
    # fp32 operands follow torch's own matmul setting (tf32 only when allowed); other dtypes ignore it
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def gemm_config(t: Tensor) -> tuple[dict, dict]:
    """(block sizes, launch options) for operands like ``t``. Interpreter: small tiles, so test shapes
    cross block edges. GPU: starting points, not tuned on a GPU yet (docs/benchmarks.md)."""
    if not t.is_cuda:
        return {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}, {}
    if t.dtype == torch.float32:
        return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, {"num_warps": 4, "num_stages": 3}
    return {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, {"num_warps": 4, "num_stages": 4}


def _e_p2(E: int) -> int:
    return max(2, triton.next_power_of_2(E))


def scatter2scatter(x: Tensor, w_EIO: Tensor, counts_E: Tensor, *, src: Optional[Tensor] = None, fan_in: int = 1,
                    dst: Optional[Tensor] = None, scale: Optional[Tensor] = None, out_rows: Optional[int] = None) -> Tensor:
    """y[dst(p)] = scale(p) * x[src(p) // fan_in] @ w[e(p)] over the N grouped rows p (N = len(src), else
    len(x)). Output [out_rows, O] (out_rows defaults to N); rows no p writes are zero."""
    N = src.numel() if src is not None else x.shape[0]
    E, I, O = w_EIO.shape
    out_rows = N if out_rows is None else out_rows
    y = x.new_empty(out_rows, O) if (dst is None or N == out_rows) else x.new_zeros(out_rows, O)
    if N == 0:
        return y
    blocks, opts = gemm_config(x)
    grid = (triton.cdiv(N, blocks["BLOCK_M"]) + E, triton.cdiv(O, blocks["BLOCK_N"]))
    _scatter2scatter_kernel[grid](
        x, w_EIO, y, src if src is not None else counts_E, dst if dst is not None else counts_E,
        scale if scale is not None else x, counts_E, E, I, O,
        x.stride(0), x.stride(1), w_EIO.stride(0), w_EIO.stride(1), w_EIO.stride(2), y.stride(0), y.stride(1),
        FAN_IN=fan_in, HAS_SRC=src is not None, HAS_DST=dst is not None, HAS_SCALE=scale is not None,
        E_P2=_e_p2(E), PRECISION=_precision(x.dtype), **blocks, **opts,
    )
    return y


def group_dw(x: Tensor, dy: Tensor, counts_E: Tensor, *, x_idx: Optional[Tensor] = None, fan_x: int = 1,
             dy_idx: Optional[Tensor] = None, fan_dy: int = 1, scale: Optional[Tensor] = None,
             dtype: Optional[torch.dtype] = None) -> Tensor:
    """dw[e] = sum over the rows p of expert e of x[x_idx(p) // fan_x]^T (scale(p) * dy[dy_idx(p) // fan_dy]);
    [E, I, O], zero for an expert without rows."""
    E, I, O = counts_E.numel(), x.shape[1], dy.shape[1]
    dw = torch.empty(E, I, O, device=x.device, dtype=dtype or x.dtype)
    blocks, opts = gemm_config(x)
    bi, bo = blocks["BLOCK_M"], blocks["BLOCK_N"]  # dW tiles like Y tiles; BLOCK_K rows of the reduction at a time
    grid = (E, triton.cdiv(I, bi) * triton.cdiv(O, bo))
    _group_dw_kernel[grid](
        x, dy, dw, x_idx if x_idx is not None else counts_E, dy_idx if dy_idx is not None else counts_E,
        scale if scale is not None else x, counts_E, E, I, O,
        x.stride(0), x.stride(1), dy.stride(0), dy.stride(1), dw.stride(0), dw.stride(1), dw.stride(2),
        FAN_X=fan_x, FAN_DY=fan_dy, HAS_XIDX=x_idx is not None, HAS_DYIDX=dy_idx is not None,
        HAS_SCALE=scale is not None, BLOCK_M=blocks["BLOCK_K"], BLOCK_I=bi, BLOCK_O=bo, E_P2=_e_p2(E),
        PRECISION=_precision(x.dtype), **opts,
    )
    return dw
