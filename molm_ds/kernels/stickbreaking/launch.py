"""Stick-breaking attention in Triton: forward, a two-pass backward without atomics, one-query decode.

Legend: B batch, Hq/Hk query/key heads (G = Hq // Hk query heads read one key head), Tq/Tk queries/keys
(query i sits at absolute position OFF + i, OFF = Tk - Tq), D head dim, BM/BN query/key tile, BD the
slice of D contracted at a time, BDV the slice of the output one program owns, NQB/NKB query/key blocks.
The maths (log space, no running max, the backward's dz formula) is derived in
``molm_ds/ops/stickbreaking_cpu.py``; this file runs the same algorithm in tiles:

    log A_ij = z_ij - R_ij,   R_ij = sum_{j <= l <= i} softplus(z_il)
    R_ij = carry_i + (suffix sum of softplus inside the tile), carry_i = the tiles to the right

Forward: one program per (query block, b*h, output slice) walks the key blocks from the diagonal to the
left, carrying carry_i, and stops once every row's stick is spent (min_i carry_i >= exit_log, the CPU
path's EXIT_LOG_STICK): the tiles further left change o by at most e^-exit_log |v|. It records, per
query block, the last key block it visited (STOP), so the backward visits exactly the same tiles.

Backward (FlashAttention-2's split, no atomics, no locks): with g_ij = A_ij dA_ij,
dz_ij = g_ij - beta_ij (g_ij + G_i - S_ij), S_ij = sum_{j' >= j} g_ij', G_i = sum_j g_ij.
  dQ pass, one program per query block: the forward's walk again, S carried right to left. G_i is
  needed from the first tile on but is exact only at the end of the walk (its sum of g): the pass
  starts from G0_i = do_i . o_i (o stored in bf16, so G0 carries o's rounding, which would enter every
  dz: 3 % error in dq under bf16, measured in the interpreter) and corrects at the end,
  dq_i = sum_j dz0_ij k_j - (G_i - G0_i) sum_j beta_ij k_j, dz0 the dz with G0; the correction is small,
  so its own bf16 rounding does not matter (dq error 0.6 %, like dk's). The pass stores the exact G_i
  and, at every visited key block, the row carries (carry_i, the sum of g to the right).
  dK/dV pass, one program per key block: every query head of its key head and every query block that
  visited this key block (per STOP); carries and G come from the dQ pass, so each tile is recomputed
  exactly; dk/dv stay in registers. For include_current=False the remainder's gradient (o_i += rem_i
  v_i) is added to the current token's dv here too.
Every output element is written by one program in a fixed order: results are bit-identical run to run.

In-tile suffix sums are ``tl.cumsum(..., reverse=True)``: an fp32 scan, exact to fp32 rounding, a few
shuffles per element where a triangular-matrix ``tl.dot`` would cost BN multiply-adds per element (and
in fp32 the matrix units' tf32/bf16 would round the stick lengths the exponent is taken of).
Masked pairs are zeroed with ``where`` on finite values (never -inf arithmetic), so no NaN can appear
from inf - inf.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from molm_ds.kernels.stickbreaking import blocks_for

__all__ = ["backward", "decode", "forward"]


@triton.jit
def _softplus(z):
    return tl.maximum(z, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(z)))


@triton.jit
def _rowdot(A, a_rows, a_mask, sa, Bt, b_rows, b_mask, sb, D,
            BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr):
    """[BM, BN] = A[a_rows, :D] @ B[b_rows, :D]^T in fp32, D contracted BD at a time."""
    dc = tl.arange(0, BD)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for d0 in range(0, D, BD):
        dd = d0 + dc
        dm = dd < D
        a = tl.load(A + a_rows[:, None] * sa + dd[None, :], mask=a_mask[:, None] & dm[None, :], other=0.0)
        b = tl.load(Bt + b_rows[:, None] * sb + dd[None, :], mask=b_mask[:, None] & dm[None, :], other=0.0)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PREC)
    return acc


@triton.jit
def _allowed(qabs, qmask, kpos, kin, KPM_b, INCLUDE: tl.constexpr, HAS_KPM: tl.constexpr):
    if INCLUDE:
        ok = kpos[None, :] <= qabs[:, None]
    else:
        ok = kpos[None, :] < qabs[:, None]
    ok = ok & kin[None, :] & qmask[:, None]
    if HAS_KPM:
        ok = ok & (tl.load(KPM_b + kpos, mask=kin, other=0) != 0)[None, :]
    return ok


@triton.jit
def _weights(z, ok, carry):
    """(A tile, softplus tile) from the logits of one tile and the row carries of the tiles to its right."""
    sp = tl.where(ok, _softplus(z), 0.0)
    r = tl.cumsum(sp, 1, reverse=True) + carry[:, None]
    return tl.where(ok, tl.exp(z - r), 0.0), sp


@triton.jit
def _dz(z, ok, a, dA, grow, gcarry):
    """(dz tile, g tile): dz = g - beta (g + G - S), S the suffix sums of g = A dA plus the carry."""
    g = a * dA
    s = tl.cumsum(g, 1, reverse=True) + gcarry[:, None]
    beta = tl.where(ok, 1.0 / (1.0 + tl.exp(-z)), 0.0)
    return g - beta * (g + grow[:, None] - s), g


@triton.jit
def _sb_fwd_kernel(
    Q, K, V, O, REM, STOP, KPM,
    Hq, G, Tq, Tk, OFF, D, NQB, scale, exit_log,
    sqb, sqh, sqt, skb, skh, skt,
    INCLUDE: tl.constexpr, HAS_KPM: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_v = tl.program_id(2)
    b = pid_bh // Hq
    h = pid_bh % Hq
    hk = h // G
    qi = pid_m * BM + tl.arange(0, BM)
    qmask = qi < Tq
    qabs = OFF + qi
    dv = pid_v * BDV + tl.arange(0, BDV)
    dvm = dv < D
    Qb = Q + b.to(tl.int64) * sqb + h * sqh
    Kb = K + b.to(tl.int64) * skb + hk * skh
    Vb = V + b.to(tl.int64) * skb + hk * skh
    KPMb = KPM + b.to(tl.int64) * Tk
    carry = tl.zeros((BM,), dtype=tl.float32)
    asum = tl.zeros((BM,), dtype=tl.float32)
    acc = tl.zeros((BM, BDV), dtype=tl.float32)
    kb = tl.cdiv(tl.minimum(OFF + pid_m * BM + BM, Tk), BN) - 1  # the diagonal key block
    kstop = kb * 0
    while kb >= kstop:
        kpos = kb * BN + tl.arange(0, BN)
        kin = kpos < Tk
        z = _rowdot(Qb, qi, qmask, sqt, Kb, kpos, kin, skt, D, BM, BN, BD, PREC) * scale
        ok = _allowed(qabs, qmask, kpos, kin, KPMb, INCLUDE, HAS_KPM)
        a, sp = _weights(z, ok, carry)
        v = tl.load(Vb + kpos[:, None] * skt + dv[None, :], mask=kin[:, None] & dvm[None, :], other=0.0)
        acc = tl.dot(a.to(v.dtype), v, acc, input_precision=PREC)
        asum += tl.sum(a, 1)
        carry += tl.sum(sp, 1)
        spent = tl.min(tl.where(qmask, carry, float("inf")), 0) >= exit_log
        kstop = tl.where(spent, kb, kstop)  # this was the last block: the loop ends
        kb -= 1
    if not INCLUDE:
        rem = tl.maximum(1.0 - asum, 0.0)
        vcur = tl.load(Vb + qabs[:, None] * skt + dv[None, :], mask=qmask[:, None] & dvm[None, :], other=0.0)
        acc += rem[:, None] * vcur.to(tl.float32)
        if pid_v == 0:
            tl.store(REM + pid_bh * Tq + qi, rem, mask=qmask)
    tl.store(O + b.to(tl.int64) * sqb + h * sqh + qi[:, None] * sqt + dv[None, :], acc.to(O.dtype.element_ty),
             mask=qmask[:, None] & dvm[None, :])
    if pid_v == 0:
        tl.store(STOP + pid_bh * NQB + pid_m, kstop)


@triton.jit
def _sb_bwd_dq_kernel(
    Q, K, V, DO, GROW0, GROW, DOV, STOP, CARRY, GCARRY, DQ, KPM,
    Hq, G, Tq, Tk, OFF, D, NQB, NKB, scale,
    sqb, sqh, sqt, skb, skh, skt,
    INCLUDE: tl.constexpr, HAS_KPM: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_v = tl.program_id(2)
    b = pid_bh // Hq
    h = pid_bh % Hq
    hk = h // G
    qi = pid_m * BM + tl.arange(0, BM)
    qmask = qi < Tq
    qabs = OFF + qi
    dv = pid_v * BDV + tl.arange(0, BDV)
    dvm = dv < D
    Qb = Q + b.to(tl.int64) * sqb + h * sqh
    DOb = DO + b.to(tl.int64) * sqb + h * sqh
    Kb = K + b.to(tl.int64) * skb + hk * skh
    Vb = V + b.to(tl.int64) * skb + hk * skh
    KPMb = KPM + b.to(tl.int64) * Tk
    grow0 = tl.load(GROW0 + pid_bh * Tq + qi, mask=qmask, other=0.0)
    if INCLUDE:
        dov = tl.zeros((BM,), dtype=tl.float32)
    else:
        dov = tl.load(DOV + pid_bh * Tq + qi, mask=qmask, other=0.0)
    carry = tl.zeros((BM,), dtype=tl.float32)
    gcarry = tl.zeros((BM,), dtype=tl.float32)
    dq = tl.zeros((BM, BDV), dtype=tl.float32)  # sum_j dz0_ij k_j
    bk = tl.zeros((BM, BDV), dtype=tl.float32)  # sum_j beta_ij k_j
    nkb = tl.cdiv(tl.minimum(OFF + pid_m * BM + BM, Tk), BN)
    kstop = tl.load(STOP + pid_bh * NQB + pid_m)
    for it in range(0, nkb - kstop):
        kb = nkb - 1 - it
        crow = (pid_bh.to(tl.int64) * NKB + kb) * Tq + qi
        if pid_v == 0:  # every output slice computes the same carries; one stores them
            tl.store(CARRY + crow, carry, mask=qmask)
            tl.store(GCARRY + crow, gcarry, mask=qmask)
        kpos = kb * BN + tl.arange(0, BN)
        kin = kpos < Tk
        z = _rowdot(Qb, qi, qmask, sqt, Kb, kpos, kin, skt, D, BM, BN, BD, PREC) * scale
        ok = _allowed(qabs, qmask, kpos, kin, KPMb, INCLUDE, HAS_KPM)
        a, sp = _weights(z, ok, carry)
        carry += tl.sum(sp, 1)
        dA = _rowdot(DOb, qi, qmask, sqt, Vb, kpos, kin, skt, D, BM, BN, BD, PREC) - dov[:, None]
        dz, g = _dz(z, ok, a, dA, grow0, gcarry)
        gcarry += tl.sum(g, 1)
        beta = tl.where(ok, 1.0 / (1.0 + tl.exp(-z)), 0.0)
        k = tl.load(Kb + kpos[:, None] * skt + dv[None, :], mask=kin[:, None] & dvm[None, :], other=0.0)
        dq = tl.dot(dz.to(k.dtype), k, dq, input_precision=PREC)
        bk = tl.dot(beta.to(k.dtype), k, bk, input_precision=PREC)
    dq = (dq - (gcarry - grow0)[:, None] * bk) * scale  # gcarry is now the exact G_i
    tl.store(DQ + b.to(tl.int64) * sqb + h * sqh + qi[:, None] * sqt + dv[None, :], dq.to(DQ.dtype.element_ty),
             mask=qmask[:, None] & dvm[None, :])
    if pid_v == 0:
        tl.store(GROW + pid_bh * Tq + qi, gcarry, mask=qmask)


@triton.jit
def _sb_bwd_dkdv_kernel(
    Q, K, V, DO, GROW, DOV, REM, STOP, CARRY, GCARRY, DK, DV, KPM,
    Hq, Hk, G, Tq, Tk, OFF, D, NQB, NKB, scale,
    sqb, sqh, sqt, skb, skh, skt,
    INCLUDE: tl.constexpr, HAS_KPM: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, PREC: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bk = tl.program_id(1)
    pid_v = tl.program_id(2)
    b = pid_bk // Hk
    hk = pid_bk % Hk
    kpos = pid_n * BN + tl.arange(0, BN)
    kin = kpos < Tk
    dv = pid_v * BDV + tl.arange(0, BDV)
    dvm = dv < D
    Kb = K + b.to(tl.int64) * skb + hk * skh
    Vb = V + b.to(tl.int64) * skb + hk * skh
    KPMb = KPM + b.to(tl.int64) * Tk
    dk = tl.zeros((BN, BDV), dtype=tl.float32)
    dvacc = tl.zeros((BN, BDV), dtype=tl.float32)
    qb0 = tl.maximum(pid_n * BN - OFF, 0) // BM  # earlier query blocks see no key of this block
    for hg in range(0, G):
        h = hk * G + hg
        bh = b * Hq + h
        Qb = Q + b.to(tl.int64) * sqb + h * sqh
        DOb = DO + b.to(tl.int64) * sqb + h * sqh
        for qb in range(qb0, NQB):
            kstop = tl.load(STOP + bh * NQB + qb)
            nkb = tl.cdiv(tl.minimum(OFF + qb * BM + BM, Tk), BN)
            if (pid_n >= kstop) & (pid_n < nkb):  # the dQ pass visited this tile and left its carries
                qi = qb * BM + tl.arange(0, BM)
                qmask = qi < Tq
                qabs = OFF + qi
                crow = (bh.to(tl.int64) * NKB + pid_n) * Tq + qi
                carry = tl.load(CARRY + crow, mask=qmask, other=0.0)
                gcarry = tl.load(GCARRY + crow, mask=qmask, other=0.0)
                grow = tl.load(GROW + bh * Tq + qi, mask=qmask, other=0.0)
                z = _rowdot(Qb, qi, qmask, sqt, Kb, kpos, kin, skt, D, BM, BN, BD, PREC) * scale
                ok = _allowed(qabs, qmask, kpos, kin, KPMb, INCLUDE, HAS_KPM)
                a, sp = _weights(z, ok, carry)
                dA = _rowdot(DOb, qi, qmask, sqt, Vb, kpos, kin, skt, D, BM, BN, BD, PREC)
                if not INCLUDE:
                    dA -= tl.load(DOV + bh * Tq + qi, mask=qmask, other=0.0)[:, None]
                dz, g = _dz(z, ok, a, dA, grow, gcarry)
                qd = qmask[:, None] & dvm[None, :]
                qc = tl.load(Qb + qi[:, None] * sqt + dv[None, :], mask=qd, other=0.0)
                doc = tl.load(DOb + qi[:, None] * sqt + dv[None, :], mask=qd, other=0.0)
                dk = tl.dot(tl.trans(dz).to(qc.dtype), qc, dk, input_precision=PREC)
                dvacc = tl.dot(tl.trans(a).to(doc.dtype), doc, dvacc, input_precision=PREC)
        if not INCLUDE:  # o_i += rem_i v_i: key j is query j - OFF's current token
            qi = kpos - OFF
            cur = kin & (qi >= 0) & (qi < Tq)
            rem = tl.load(REM + bh * Tq + qi, mask=cur, other=0.0)
            doc = tl.load(DOb + qi[:, None] * sqt + dv[None, :], mask=cur[:, None] & dvm[None, :], other=0.0)
            dvacc += rem[:, None] * doc.to(tl.float32)
    kd = kin[:, None] & dvm[None, :]
    tl.store(DK + b.to(tl.int64) * skb + hk * skh + kpos[:, None] * skt + dv[None, :], (dk * scale).to(DK.dtype.element_ty), mask=kd)
    tl.store(DV + b.to(tl.int64) * skb + hk * skh + kpos[:, None] * skt + dv[None, :], dvacc.to(DV.dtype.element_ty), mask=kd)


@triton.jit
def _sb_decode_kernel(
    Q, K, V, O, KPM, Hq, G, Tk, D, scale,
    sqb, sqh, skb, skh, skt,
    INCLUDE: tl.constexpr, HAS_KPM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
):
    """One query (position Tk - 1) per (b, h) over cached keys; vector code, no dot (a dot needs 16 rows)."""
    pid = tl.program_id(0)
    b = pid // Hq
    h = pid % Hq
    hk = h // G
    dd = tl.arange(0, BD)
    dmask = dd < D
    q = tl.load(Q + b.to(tl.int64) * sqb + h * sqh + dd, mask=dmask, other=0.0).to(tl.float32)
    Kb = K + b.to(tl.int64) * skb + hk * skh
    Vb = V + b.to(tl.int64) * skb + hk * skh
    last = Tk if INCLUDE else Tk - 1
    nkb = tl.cdiv(last, BN)
    carry = tl.zeros((1,), dtype=tl.float32)
    asum = tl.zeros((1,), dtype=tl.float32)
    acc = tl.zeros((BD,), dtype=tl.float32)
    for it in range(0, nkb):
        kpos = (nkb - 1 - it) * BN + tl.arange(0, BN)
        ok = kpos < last
        if HAS_KPM:
            ok = ok & (tl.load(KPM + b.to(tl.int64) * Tk + kpos, mask=kpos < Tk, other=0) != 0)
        kv = ok[:, None] & dmask[None, :]
        k = tl.load(Kb + kpos[:, None] * skt + dd[None, :], mask=kv, other=0.0).to(tl.float32)
        z = tl.sum(k * q[None, :], 1) * scale
        sp = tl.where(ok, _softplus(z), 0.0)
        a = tl.where(ok, tl.exp(z - tl.cumsum(sp, 0, reverse=True) - carry), 0.0)
        v = tl.load(Vb + kpos[:, None] * skt + dd[None, :], mask=kv, other=0.0).to(tl.float32)
        acc += tl.sum(a[:, None] * v, 0)
        asum += tl.sum(a, 0)
        carry += tl.sum(sp, 0)
    if not INCLUDE:
        vcur = tl.load(Vb + (Tk - 1) * skt + dd, mask=dmask, other=0.0).to(tl.float32)
        acc += tl.maximum(1.0 - asum, 0.0) * vcur
    tl.store(O + b.to(tl.int64) * sqb + h * sqh + dd, acc.to(O.dtype.element_ty), mask=dmask)


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _launch_opts(bl) -> dict:
    return {"num_warps": bl.num_warps, "num_stages": bl.num_stages}


def _common(q: Tensor, k: Tensor):
    B, Hq, Tq, D = q.shape
    Hk, Tk = k.shape[1], k.shape[2]
    bl = blocks_for(D, q.dtype, q.is_cuda)
    return B, Hq, Hk, Tq, Tk, D, bl, triton.cdiv(Tq, bl.BM), triton.cdiv(Tk, bl.BN), triton.cdiv(D, bl.BDV)


def _kpm(kpm: Optional[Tensor], fallback: Tensor) -> Tensor:
    return kpm.to(torch.int8).contiguous() if kpm is not None else fallback


def forward(q: Tensor, k: Tensor, v: Tensor, kpm: Optional[Tensor], include_current: bool,
            exit_log: float) -> tuple[Tensor, Tensor, Tensor]:
    """(o [B,Hq,Tq,D], rem [B,Hq,Tq] fp32 (empty when include_current), stop [B*Hq, NQB] int32: the last
    key block each query block visited). q, k, v contiguous, k and v of one shape."""
    B, Hq, Hk, Tq, Tk, D, bl, nqb, _, ndv = _common(q, k)
    o = torch.empty_like(q)
    rem = torch.empty(0 if include_current else B * Hq * Tq, device=q.device, dtype=torch.float32)
    stop = torch.empty(B * Hq, nqb, device=q.device, dtype=torch.int32)
    opts = _launch_opts(bl) if q.is_cuda else {}
    _sb_fwd_kernel[(nqb, B * Hq, ndv)](
        q, k, v, o, rem, stop, _kpm(kpm, stop),
        Hq, Hq // Hk, Tq, Tk, Tk - Tq, D, nqb, 1.0 / math.sqrt(D), float(exit_log),
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        INCLUDE=include_current, HAS_KPM=kpm is not None,
        BM=bl.BM, BN=bl.BN, BD=bl.BD, BDV=bl.BDV, PREC=_precision(q.dtype), **opts,
    )
    return o, rem.view(B, Hq, Tq) if not include_current else rem, stop


def backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, rem: Tensor, stop: Tensor,
             kpm: Optional[Tensor], include_current: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of ``forward``'s o, visiting the tiles ``stop`` says the forward visited."""
    B, Hq, Hk, Tq, Tk, D, bl, nqb, nkb, ndv = _common(q, k)
    G, off = Hq // Hk, Tk - Tq
    do = do.contiguous()
    dof = do.float()
    if include_current:
        grow0 = (dof * o.float()).sum(-1)  # G_i = do_i . o_i, up to o's rounding
        dov = grow0
    else:
        v_cur = v[:, :, off:].float().repeat_interleave(G, dim=1)
        grow0 = (dof * (o.float() - v_cur)).sum(-1)  # G_i = do_i . (o_i - v_i)
        dov = (dof * v_cur).sum(-1).contiguous()  # do_i . v_i, subtracted from every dA_ij
    grow0 = grow0.contiguous()
    grow = torch.empty_like(grow0)  # the exact G_i, written by the dQ pass
    carry = torch.empty(B * Hq * nkb * Tq, device=q.device, dtype=torch.float32)
    gcarry = torch.empty_like(carry)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    kpm_i8 = _kpm(kpm, stop)
    rem_arg = rem if not include_current else grow
    common = dict(INCLUDE=include_current, HAS_KPM=kpm is not None, BM=bl.BM, BN=bl.BN, BD=bl.BD, BDV=bl.BDV,
                  PREC=_precision(q.dtype), **(_launch_opts(bl) if q.is_cuda else {}))
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2))
    scale = 1.0 / math.sqrt(D)
    _sb_bwd_dq_kernel[(nqb, B * Hq, ndv)](
        q, k, v, do, grow0, grow, dov, stop, carry, gcarry, dq, kpm_i8,
        Hq, G, Tq, Tk, off, D, nqb, nkb, scale, *strides, **common,
    )
    _sb_bwd_dkdv_kernel[(nkb, B * Hk, ndv)](
        q, k, v, do, grow, dov, rem_arg, stop, carry, gcarry, dk, dv, kpm_i8,
        Hq, Hk, G, Tq, Tk, off, D, nqb, nkb, scale, *strides, **common,
    )
    return dq, dk, dv


def decode(q: Tensor, k: Tensor, v: Tensor, kpm: Optional[Tensor], include_current: bool) -> Tensor:
    """o for one new query per (b, h) over cached k/v (q [B, Hq, 1, D]); no autograd."""
    B, Hq, _, D = q.shape
    Hk, Tk = k.shape[1], k.shape[2]
    o = torch.empty_like(q)
    bd = max(16, triton.next_power_of_2(D))
    bn = max(16, min(64, 8192 // bd))  # keep a [BN, BD] tile within the registers
    _sb_decode_kernel[(B * Hq,)](
        q, k, v, o, _kpm(kpm, o), Hq, Hq // Hk, Tk, D, 1.0 / math.sqrt(D),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2),
        INCLUDE=include_current, HAS_KPM=kpm is not None, BN=bn, BD=bd,
    )
    return o
