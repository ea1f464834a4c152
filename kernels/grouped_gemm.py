"""Scattered grouped expert GEMM in Triton: gather + GEMM + scatter fused, no padded tensors.

Legend: T tokens, K experts per token, N = T*K (token, expert) slots, E experts, I/O in/out width.
Slots are sorted by expert: `sorted_slot_N[p]` is the flat slot id t*K + kk of the p-th row of the
expert-grouped order, `offsets_E1` the row offsets of each expert in that order (offsets[0] = 0).

Tier 1: `_scatter2scatter_kernel` (Y[dst(p)] = X[src(p)] @ W[e(p)]) and `_group_dw_kernel`
(dW[e] = sum_p X[src(p)]^T dY[dst(p)]), with their launchers. A program owns BLOCK_M rows of one
expert only (blocks never straddle experts), so no block is padded in memory and no atomics are needed.
Tier 2: `ScatteredExperts` (autograd: dX, dW, and dgates when gates are applied) and
`grouped_gemm_triton` (the `molm_ds.ops.grouped_gemm` contract: rows already grouped).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from kernels import triton_available

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _scatter2scatter_kernel(
        X, W, Y, SRC, DST, BLK_E, BLK_START, BLK_END,
        I, O,
        sxm, sxk, swe, swk, swn, sym, syn,
        FAN_IN: tl.constexpr, HAS_SRC: tl.constexpr, HAS_DST: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        e = tl.load(BLK_E + pid_m)
        start = tl.load(BLK_START + pid_m)
        end = tl.load(BLK_END + pid_m)
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
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, I, BLOCK_K):
                kk = k0 + ks
                kmask = kk < I
                x = tl.load(X + src[:, None].to(tl.int64) * sxm + kk[None, :] * sxk, mask=rmask[:, None] & kmask[None, :], other=0.0)
                w = tl.load(W + e.to(tl.int64) * swe + kk[:, None] * swk + cols[None, :] * swn, mask=kmask[:, None] & cmask[None, :], other=0.0)
                acc += tl.dot(x, w, input_precision="ieee")
            if HAS_DST:
                dst = tl.load(DST + rows, mask=rmask, other=0)
            else:
                dst = rows
            tl.store(Y + dst[:, None].to(tl.int64) * sym + cols[None, :] * syn, acc.to(Y.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])

    @triton.jit
    def _group_dw_kernel(
        X, DY, DW, SRC, DST, OFFS,
        I, O,
        sxm, sxk, sym, syn, swe, swk, swn,
        FAN_IN: tl.constexpr, HAS_SRC: tl.constexpr, HAS_DST: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_O: tl.constexpr,
    ):
        e = tl.program_id(0)
        pid = tl.program_id(1)
        n_o = tl.cdiv(O, BLOCK_O)
        ri = (pid // n_o) * BLOCK_I + tl.arange(0, BLOCK_I)
        ro = (pid % n_o) * BLOCK_O + tl.arange(0, BLOCK_O)
        imask = ri < I
        omask = ro < O
        start = tl.load(OFFS + e)
        end = tl.load(OFFS + e + 1)
        acc = tl.zeros((BLOCK_I, BLOCK_O), dtype=tl.float32)
        for m0 in range(start, end, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            rmask = rows < end
            if HAS_SRC:
                src = tl.load(SRC + rows, mask=rmask, other=0) // FAN_IN
            else:
                src = rows
            if HAS_DST:
                dst = tl.load(DST + rows, mask=rmask, other=0)
            else:
                dst = rows
            xt = tl.load(X + src[None, :].to(tl.int64) * sxm + ri[:, None] * sxk, mask=imask[:, None] & rmask[None, :], other=0.0)
            dy = tl.load(DY + dst[:, None].to(tl.int64) * sym + ro[None, :] * syn, mask=rmask[:, None] & omask[None, :], other=0.0)
            acc += tl.dot(xt, dy, input_precision="ieee")
        tl.store(DW + e.to(tl.int64) * swe + ri[:, None] * swk + ro[None, :] * swn, acc.to(DW.dtype.element_ty), mask=imask[:, None] & omask[None, :])


def _blocks(offsets_E1: Tensor, block_m: int, n_rows: int):
    """Per program: expert, first row, end row. Grid size is an upper bound (no host sync)."""
    counts = offsets_E1[1:] - offsets_E1[:-1]
    nblk = (counts + block_m - 1) // block_m
    cum = torch.cumsum(nblk, 0)
    ub = (n_rows + block_m - 1) // block_m + offsets_E1.numel() - 1
    b = torch.arange(max(ub, 1), device=offsets_E1.device)
    e = torch.searchsorted(cum, b, right=True).clamp_max(counts.numel() - 1)
    local = b - (cum[e] - nblk[e])
    start = offsets_E1[e] + local * block_m
    end = offsets_E1[e + 1]
    start = torch.where(b < cum[-1], start, end)  # spare programs do nothing
    return e.to(torch.int32).contiguous(), start.to(torch.int32).contiguous(), end.to(torch.int32).contiguous()


def scatter2scatter(x: Tensor, w_EIO: Tensor, offsets_E1: Tensor, n_rows: int, *, src: Optional[Tensor], dst: Optional[Tensor],
                    fan_in: int, out_rows: int, block_m: int = 64, block_n: int = 64, block_k: int = 32) -> Tensor:
    """Launcher: y[dst(p)] = x[src(p) // fan_in] @ w[e(p)] for the n_rows grouped rows p (src/dst None = p)."""
    y = x.new_zeros(out_rows, w_EIO.shape[2])
    if n_rows == 0:
        return y
    be, bs, bend = _blocks(offsets_E1, block_m, n_rows)
    O, I = w_EIO.shape[2], w_EIO.shape[1]
    grid = (be.numel(), triton.cdiv(O, block_n))
    dummy = bs
    _scatter2scatter_kernel[grid](
        x, w_EIO, y, src if src is not None else dummy, dst if dst is not None else dummy, be, bs, bend,
        I, O, x.stride(0), x.stride(1), w_EIO.stride(0), w_EIO.stride(1), w_EIO.stride(2), y.stride(0), y.stride(1),
        FAN_IN=fan_in, HAS_SRC=src is not None, HAS_DST=dst is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    return y


def group_dw(x: Tensor, dy: Tensor, offsets_E1: Tensor, *, src: Optional[Tensor], dst: Optional[Tensor], fan_in: int,
             I: int, O: int, dtype, block_m: int = 32, block_i: int = 64, block_o: int = 64) -> Tensor:
    """Launcher: dw[e] = sum over rows p of expert e of x[src(p) // fan_in]^T dy[dst(p)]."""
    E = offsets_E1.numel() - 1
    dw = torch.zeros(E, I, O, device=x.device, dtype=dtype)
    grid = (E, triton.cdiv(I, block_i) * triton.cdiv(O, block_o))
    dummy = offsets_E1
    _group_dw_kernel[grid](
        x, dy, dw, src if src is not None else dummy, dst if dst is not None else dummy, offsets_E1,
        I, O, x.stride(0), x.stride(1), dy.stride(0), dy.stride(1), dw.stride(0), dw.stride(1), dw.stride(2),
        FAN_IN=fan_in, HAS_SRC=src is not None, HAS_DST=dst is not None, BLOCK_M=block_m, BLOCK_I=block_i, BLOCK_O=block_o,
    )
    return dw


class ScatteredExperts(torch.autograd.Function):
    """y = experts(x) with routing given as sorted slots; optional gate combine.

    x: [T, I] token order (x_grouped=False, each row is read by its K slots) or [N, I] grouped.
    Output: [N, O] grouped (y_grouped=True), [T*K, O] slot order (y_grouped=False, no gates),
    or [T, O] = sum_k gates_TK[t, k] * y[t, k] when gates are given.
    """

    @staticmethod
    def forward(ctx, x, w_EIO, K, sorted_slot_N, offsets_E1, gates_TK, x_grouped, y_grouped):
        N = sorted_slot_N.numel()
        src = None if x_grouped else sorted_slot_N
        fan_in = 1 if x_grouped else K
        if gates_TK is not None and y_grouped:
            raise ValueError("ScatteredExperts: gates are applied in token order; pass y_grouped=False with gates")
        dst = None if y_grouped else sorted_slot_N
        y = scatter2scatter(x, w_EIO, offsets_E1, N, src=src, dst=dst, fan_in=fan_in, out_rows=N)
        ctx.save_for_backward(x, w_EIO, sorted_slot_N, offsets_E1, gates_TK if gates_TK is not None else y.new_empty(0), y if gates_TK is not None else y.new_empty(0))
        ctx.cfg = (K, x_grouped, y_grouped, gates_TK is not None)
        if gates_TK is not None:
            T = gates_TK.shape[0]
            return torch.bmm(gates_TK.unsqueeze(1).to(y.dtype), y.view(T, K, -1)).squeeze(1)
        return y

    @staticmethod
    def backward(ctx, dout):
        x, w, slot, offs, gates, y = ctx.saved_tensors
        K, x_grouped, y_grouped, has_gates = ctx.cfg
        N = slot.numel()
        dgates = None
        if has_gates:
            T = gates.shape[0]
            y_TKO = y.view(T, K, -1)
            dgates = torch.bmm(y_TKO, dout.unsqueeze(2)).squeeze(2).to(gates.dtype)  # dy_t . y_tk
            dy = (gates.unsqueeze(2).to(dout.dtype) * dout.unsqueeze(1)).reshape(T * K, -1)
        else:
            dy = dout
        dy = dy.contiguous()
        dy_rows = None if y_grouped else slot  # where row p's gradient lives in dy
        src = None if x_grouped else slot
        fan_in = 1 if x_grouped else K
        dw = group_dw(x, dy, offs, src=src, dst=dy_rows, fan_in=fan_in, I=w.shape[1], O=w.shape[2], dtype=w.dtype)
        # dX rows in grouped order (dX_p = dY_p W_e^T), then summed over the K slots for token order.
        dx_N = scatter2scatter(dy, w.transpose(1, 2), offs, N, src=dy_rows, dst=None if x_grouped else slot, fan_in=1, out_rows=N)
        dx = dx_N if x_grouped else dx_N.view(x.shape[0], K, -1).sum(1)
        return dx.to(x.dtype), dw, None, None, None, dgates, None, None


def sort_slots(idx_TK: Tensor, num_experts: int):
    """Routing -> (sorted_slot_N, offsets_E1): slots ordered by expert (stable in token order)."""
    flat = idx_TK.reshape(-1)
    order = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=num_experts)
    offsets = torch.zeros(num_experts + 1, dtype=torch.int32, device=flat.device)
    offsets[1:] = torch.cumsum(counts, 0)
    return order.to(torch.int32), offsets


def scattered_experts(x_TI: Tensor, w_EIO: Tensor, idx_TK: Tensor, gates_TK: Optional[Tensor] = None) -> Tensor:
    """Token order in, token order out: sum_k gates[t,k] x_t W_{idx[t,k]} -> [T, O] (or [T, K, O] without gates)."""
    T, K = idx_TK.shape
    slot, offs = sort_slots(idx_TK, w_EIO.shape[0])
    y = ScatteredExperts.apply(x_TI, w_EIO, K, slot, offs, gates_TK, False, False)
    return y if gates_TK is not None else y.view(T, K, -1)


def grouped_gemm_triton(x_NI: Tensor, w_EIO: Tensor, counts_E: Tensor) -> Tensor:
    """`molm_ds.ops.grouped_gemm` contract on the Triton kernel (rows already grouped by expert)."""
    offs = torch.zeros(counts_E.numel() + 1, dtype=torch.int32, device=x_NI.device)
    offs[1:] = torch.cumsum(counts_E.to(x_NI.device), 0)
    slot = torch.arange(x_NI.shape[0], dtype=torch.int32, device=x_NI.device)
    return ScatteredExperts.apply(x_NI, w_EIO, 1, slot, offs, None, True, True)
