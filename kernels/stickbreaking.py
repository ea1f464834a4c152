"""Stick-breaking attention in Triton: forward, backward, one-query decode.

Legend: B batch, Hq/Hk query/key heads (G = Hq // Hk), Tq/Tk queries/keys (query i sits at absolute
position OFF + i, OFF = Tk - Tq), D head dim, BM/BN query/key block sizes.

Every program owns BM queries of one (b, h) and walks the key blocks from the diagonal backwards,
carrying the log-stick prefix (sum of softplus over later keys), so no [Tq, Tk] tensor exists. The
in-block suffix sums are a dot with a triangular 0/1 matrix. Masked pairs are handled with `where`
on finite values (never -inf arithmetic), so dq cannot pick up NaNs from inf - inf. The backward
recomputes the tiles (see `molm_ds/ops/stickbreaking_cpu.py` for the derivation, same algorithm):
dq stays in registers, dk/dv go to fp32 buffers with `tl.atomic_add` -- no spin-locks, so no hang.
Variable-length packed sequences: `seg_BT` (segment id per position) -- keys of another segment are
masked, exactly like padding keys (`key_padding_mask`).

Tier 2: `StickBreakingTriton` (autograd) and `stickbreaking_triton` (the `molm_ds.ops` contract),
`stickbreaking_varlen` (cu_seqlens), `stickbreaking_decode` (Tq = 1, no grad).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from kernels import triton_available

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _tile(q, k_ptrs, kpos, qabs, b, Tk, kpm_ptr, seg_ptr, qseg, scale, kmask_d,
              INCLUDE: tl.constexpr, HAS_KPM: tl.constexpr, HAS_SEG: tl.constexpr):
        kin = kpos < Tk
        k = tl.load(k_ptrs, mask=kin[:, None] & kmask_d[None, :], other=0.0)
        z = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        if INCLUDE:
            ok = kpos[None, :] <= qabs[:, None]
        else:
            ok = kpos[None, :] < qabs[:, None]
        ok = ok & kin[None, :]
        if HAS_KPM:
            ok = ok & (tl.load(kpm_ptr + b * Tk + kpos, mask=kin, other=0) != 0)[None, :]
        if HAS_SEG:
            ok = ok & (tl.load(seg_ptr + b * Tk + kpos, mask=kin, other=-1)[None, :] == qseg[:, None])
        sp = tl.where(ok, tl.maximum(z, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(z))), 0.0)
        return k, z, ok, sp

    @triton.jit
    def _sb_fwd_kernel(
        Q, K, V, O, REM, KPM, SEG,
        Hq, G, Tq, Tk, OFF, D, scale,
        sqb, sqh, sqt, skb, skh, skt, sob, soh, sot,
        INCLUDE: tl.constexpr, HAS_KPM: tl.constexpr, HAS_SEG: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // Hq
        h = pid_bh % Hq
        hk = h // G
        qi = pid_m * BM + tl.arange(0, BM)
        qmask = qi < Tq
        qabs = OFF + qi
        dd = tl.arange(0, BD)
        dmask = dd < D
        q = tl.load(Q + b * sqb + h * sqh + qi[:, None] * sqt + dd[None, :], mask=qmask[:, None] & dmask[None, :], other=0.0)
        qseg = tl.zeros((BM,), dtype=tl.int32)
        if HAS_SEG:
            qseg = tl.load(SEG + b * Tk + qabs, mask=qmask, other=-2)
        tri = (tl.arange(0, BN)[:, None] >= tl.arange(0, BN)[None, :]).to(tl.float32)
        carry = tl.zeros((BM,), dtype=tl.float32)
        asum = tl.zeros((BM,), dtype=tl.float32)
        acc = tl.zeros((BM, BD), dtype=tl.float32)
        last = tl.minimum(OFF + pid_m * BM + BM, Tk)  # keys [0, last) can be reached by this block
        nkb = tl.cdiv(last, BN)
        kbase = K + b * skb + hk * skh
        vbase = V + b * skb + hk * skh
        for it in range(0, nkb):
            kpos = (nkb - 1 - it) * BN + tl.arange(0, BN)
            k, z, ok, sp = _tile(q, kbase + kpos[:, None] * skt + dd[None, :], kpos, qabs, b, Tk, KPM, SEG, qseg, scale, dmask,
                                 INCLUDE, HAS_KPM, HAS_SEG)
            r = tl.dot(sp, tri, input_precision="ieee")
            a = tl.where(ok, tl.exp(z - r - carry[:, None]), 0.0)
            v = tl.load(vbase + kpos[:, None] * skt + dd[None, :], mask=(kpos < Tk)[:, None] & dmask[None, :], other=0.0)
            acc += tl.dot(a.to(v.dtype), v, input_precision="ieee")
            asum += tl.sum(a, 1)
            carry += tl.sum(sp, 1)
        if not INCLUDE:
            rem = tl.maximum(1.0 - asum, 0.0)
            vcur = tl.load(vbase + qabs[:, None] * skt + dd[None, :], mask=qmask[:, None] & dmask[None, :], other=0.0)
            acc += rem[:, None] * vcur.to(tl.float32)
            tl.store(REM + pid_bh * Tq + qi, rem, mask=qmask)
        tl.store(O + b * sob + h * soh + qi[:, None] * sot + dd[None, :], acc.to(O.dtype.element_ty), mask=qmask[:, None] & dmask[None, :])

    @triton.jit
    def _sb_bwd_kernel(
        Q, K, V, DO, GROW, DOV, DQ, DK, DV, KPM, SEG,
        Hq, G, Tq, Tk, OFF, D, scale,
        sqb, sqh, sqt, skb, skh, skt, sdkb, sdkh, sdkt,
        INCLUDE: tl.constexpr, HAS_KPM: tl.constexpr, HAS_SEG: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // Hq
        h = pid_bh % Hq
        hk = h // G
        qi = pid_m * BM + tl.arange(0, BM)
        qmask = qi < Tq
        qabs = OFF + qi
        dd = tl.arange(0, BD)
        dmask = dd < D
        qd = qmask[:, None] & dmask[None, :]
        q = tl.load(Q + b * sqb + h * sqh + qi[:, None] * sqt + dd[None, :], mask=qd, other=0.0)
        do = tl.load(DO + b * sqb + h * sqh + qi[:, None] * sqt + dd[None, :], mask=qd, other=0.0)
        grow = tl.load(GROW + pid_bh * Tq + qi, mask=qmask, other=0.0)
        dov = tl.zeros((BM,), dtype=tl.float32)
        if not INCLUDE:
            dov = tl.load(DOV + pid_bh * Tq + qi, mask=qmask, other=0.0)
        qseg = tl.zeros((BM,), dtype=tl.int32)
        if HAS_SEG:
            qseg = tl.load(SEG + b * Tk + qabs, mask=qmask, other=-2)
        tri = (tl.arange(0, BN)[:, None] >= tl.arange(0, BN)[None, :]).to(tl.float32)
        carry = tl.zeros((BM,), dtype=tl.float32)
        gcarry = tl.zeros((BM,), dtype=tl.float32)
        dq = tl.zeros((BM, BD), dtype=tl.float32)
        last = tl.minimum(OFF + pid_m * BM + BM, Tk)
        nkb = tl.cdiv(last, BN)
        kbase = K + b * skb + hk * skh
        vbase = V + b * skb + hk * skh
        for it in range(0, nkb):
            kpos = (nkb - 1 - it) * BN + tl.arange(0, BN)
            kd = (kpos < Tk)[:, None] & dmask[None, :]
            k, z, ok, sp = _tile(q, kbase + kpos[:, None] * skt + dd[None, :], kpos, qabs, b, Tk, KPM, SEG, qseg, scale, dmask,
                                 INCLUDE, HAS_KPM, HAS_SEG)
            r = tl.dot(sp, tri, input_precision="ieee")
            a = tl.where(ok, tl.exp(z - r - carry[:, None]), 0.0)
            carry += tl.sum(sp, 1)
            v = tl.load(vbase + kpos[:, None] * skt + dd[None, :], mask=kd, other=0.0)
            dA = tl.dot(do, tl.trans(v), input_precision="ieee")
            if not INCLUDE:
                dA = dA - dov[:, None]
            g = a * dA
            s = tl.dot(g, tri, input_precision="ieee") + gcarry[:, None]
            gcarry += tl.sum(g, 1)
            beta = tl.where(ok, 1.0 / (1.0 + tl.exp(-z)), 0.0)
            dz = g - beta * (g + grow[:, None] - s)
            dq += tl.dot(dz.to(k.dtype), k, input_precision="ieee")
            dk = tl.dot(tl.trans(dz).to(q.dtype), q, input_precision="ieee") * scale
            dv = tl.dot(tl.trans(a).to(do.dtype), do, input_precision="ieee")
            offs = b * sdkb + hk * sdkh + kpos[:, None] * sdkt + dd[None, :]
            tl.atomic_add(DK + offs, dk, mask=kd)
            tl.atomic_add(DV + offs, dv, mask=kd)
        tl.store(DQ + b * sqb + h * sqh + qi[:, None] * sqt + dd[None, :], (dq * scale).to(DQ.dtype.element_ty), mask=qd)

    @triton.jit
    def _sb_decode_kernel(
        Q, K, V, O, KPM, Hq, G, Tk, D, scale,
        sqb, sqh, skb, skh, skt, sob, soh,
        INCLUDE: tl.constexpr, HAS_KPM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
    ):
        """One query (position Tk - 1) per program over cached K/V; vector code, no dots."""
        pid = tl.program_id(0)
        b = pid // Hq
        h = pid % Hq
        hk = h // G
        dd = tl.arange(0, BD)
        dmask = dd < D
        q = tl.load(Q + b * sqb + h * sqh + dd, mask=dmask, other=0.0).to(tl.float32)
        kbase = K + b * skb + hk * skh
        vbase = V + b * skb + hk * skh
        qpos = Tk - 1
        last = Tk if INCLUDE else Tk - 1
        nkb = tl.cdiv(last, BN)
        carry = tl.zeros((1,), dtype=tl.float32)
        asum = tl.zeros((1,), dtype=tl.float32)
        acc = tl.zeros((BD,), dtype=tl.float32)
        for it in range(0, nkb):
            kpos = (nkb - 1 - it) * BN + tl.arange(0, BN)
            ok = kpos < last
            if HAS_KPM:
                ok = ok & (tl.load(KPM + b * Tk + kpos, mask=kpos < Tk, other=0) != 0)
            k = tl.load(kbase + kpos[:, None] * skt + dd[None, :], mask=ok[:, None] & dmask[None, :], other=0.0).to(tl.float32)
            z = tl.sum(k * q[None, :], 1) * scale
            sp = tl.where(ok, tl.maximum(z, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(z))), 0.0)
            r = tl.cumsum(sp, 0, reverse=True)
            a = tl.where(ok, tl.exp(z - r - carry), 0.0)
            v = tl.load(vbase + kpos[:, None] * skt + dd[None, :], mask=ok[:, None] & dmask[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(a[:, None] * v, 0)
            asum += tl.sum(a, 0)
            carry += tl.sum(sp, 0)
        if not INCLUDE:
            vcur = tl.load(vbase + qpos * skt + dd, mask=dmask, other=0.0).to(tl.float32)
            acc += tl.maximum(1.0 - asum, 0.0) * vcur
        tl.store(O + b * sob + h * soh + dd, acc.to(O.dtype.element_ty), mask=dmask)


def _blocks(d: int):
    bd = max(16, triton.next_power_of_2(d))
    bm = 64 if bd <= 64 else 32
    return bm, 64 if bd <= 64 else 32, bd


class StickBreakingTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, include_current, kpm, seg):
        B, Hq, Tq, D = q.shape
        Hk, Tk = k.shape[1], k.shape[2]
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        o = torch.empty_like(q)
        rem = torch.empty(B * Hq * Tq, device=q.device, dtype=torch.float32)
        BM, BN, BD = _blocks(D)
        scale = 1.0 / math.sqrt(D)
        kpm_i8 = kpm.to(torch.int8).contiguous() if kpm is not None else rem
        seg_i = seg.to(torch.int32).contiguous() if seg is not None else rem
        grid = (triton.cdiv(Tq, BM), B * Hq)
        _sb_fwd_kernel[grid](
            q, k, v, o, rem, kpm_i8, seg_i, Hq, Hq // Hk, Tq, Tk, Tk - Tq, D, scale,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), o.stride(0), o.stride(1), o.stride(2),
            INCLUDE=include_current, HAS_KPM=kpm is not None, HAS_SEG=seg is not None, BM=BM, BN=BN, BD=BD,
        )
        ctx.save_for_backward(q, k, v, o, rem, kpm_i8, seg_i)
        ctx.cfg = (include_current, kpm is not None, seg is not None)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, rem, kpm_i8, seg_i = ctx.saved_tensors
        include_current, has_kpm, has_seg = ctx.cfg
        B, Hq, Tq, D = q.shape
        Hk, Tk = k.shape[1], k.shape[2]
        G = Hq // Hk
        do = do.contiguous()
        dof = do.float()
        if include_current:
            grow = (dof * o.float()).sum(-1)
            dov = grow
        else:
            v_cur = v[:, :, Tk - Tq :].float().repeat_interleave(G, dim=1)
            grow = (dof * (o.float() - v_cur)).sum(-1)  # G_i = do_i . (o_i - v_i)
            dov = (dof * v_cur).sum(-1)
        grow, dov = grow.contiguous(), dov.contiguous()
        dq = torch.empty_like(q)
        dk = torch.zeros(k.shape, device=k.device, dtype=torch.float32)
        dv = torch.zeros(v.shape, device=v.device, dtype=torch.float32)
        BM, BN, BD = _blocks(D)
        grid = (triton.cdiv(Tq, BM), B * Hq)
        _sb_bwd_kernel[grid](
            q, k, v, do, grow, dov, dq, dk, dv, kpm_i8, seg_i, Hq, G, Tq, Tk, Tk - Tq, D, 1.0 / math.sqrt(D),
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), dk.stride(0), dk.stride(1), dk.stride(2),
            INCLUDE=include_current, HAS_KPM=has_kpm, HAS_SEG=has_seg, BM=BM, BN=BN, BD=BD,
        )
        if not include_current:  # o_i += rem_i v_i
            dv[:, :, Tk - Tq :] += (rem.view(B, Hk, G, Tq, 1) * dof.view(B, Hk, G, Tq, D)).sum(2)
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None


def stickbreaking_decode(q: Tensor, k: Tensor, v: Tensor, *, include_current: bool = True, key_padding_mask: Optional[Tensor] = None) -> Tensor:
    """One new query per (b, h) over cached k/v: q [B, Hq, 1, d]; no autograd."""
    B, Hq, _, D = q.shape
    Hk, Tk = k.shape[1], k.shape[2]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    o = torch.empty_like(q)
    BD = max(16, triton.next_power_of_2(D))
    kpm = key_padding_mask.to(torch.int8).contiguous() if key_padding_mask is not None else o
    _sb_decode_kernel[(B * Hq,)](
        q, k, v, o, kpm, Hq, Hq // Hk, Tk, D, 1.0 / math.sqrt(D),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), o.stride(0), o.stride(1),
        INCLUDE=include_current, HAS_KPM=key_padding_mask is not None, BN=64, BD=BD,
    )
    return o


def stickbreaking_triton(q: Tensor, k: Tensor, v: Tensor, *, include_current: bool = True, key_padding_mask: Optional[Tensor] = None) -> Tensor:
    """`molm_ds.ops.stickbreaking_attention` contract on the Triton kernels."""
    if q.shape[2] == 1 and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
        return stickbreaking_decode(q, k, v, include_current=include_current, key_padding_mask=key_padding_mask)
    return StickBreakingTriton.apply(q, k, v, include_current, key_padding_mask, None)


def stickbreaking_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, *, include_current: bool = True) -> Tensor:
    """Packed variable-length sequences: q [Hq, Ttot, d], k = v [Hk, Ttot, d], cu_seqlens [S+1] (int,
    starts with 0, ends with Ttot). Each token attends only within its own sequence."""
    Ttot = q.shape[1]
    if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != Ttot:
        raise ValueError(f"stickbreaking_varlen: cu_seqlens must run from 0 to Ttot={Ttot}, got {cu_seqlens.tolist()}")
    pos = torch.arange(Ttot, device=q.device)
    seg = (torch.searchsorted(cu_seqlens.to(q.device), pos, right=True) - 1)[None]
    return StickBreakingTriton.apply(q[None], k[None], v[None], include_current, None, seg)[0]
