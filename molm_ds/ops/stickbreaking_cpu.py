"""Block-wise stick-breaking attention in PyTorch (the fast path off CUDA), with a hand-written backward.

Legend: B batch, Hk key heads, g = Hq // Hk query heads per key head, Tq/Tk queries/keys, d head dim,
bq/bk block sizes. Queries are tiled in blocks; for each query block the key blocks are visited from
the diagonal backwards, carrying the log-stick prefix `carry_i = sum_{l in later blocks, l <= i}
softplus(z_il)`; no [Tq, Tk] tensor is ever built (tiles are [bq, bk]).

    log A_ij = z_ij - R_ij - carry_i,   R_ij = sum_{l >= j in block} softplus(z_il)

Early exit: sum_{j left of a tile} A_ij <= exp(-carry_i) (what is left of the stick), and every term of
the backward for those keys is a multiple of such A's (see dz below). Once carry_i >= EXIT_LOG_STICK for
every row of the query tile, the remaining key tiles change o, dq, dk, dv by at most exp(-40) ~ 4e-18
times |v| or |do|, far below fp32 rounding, so both passes stop there. Heads that break the stick
quickly (local attention: random logits lose the stick within ~50 keys) then cost O(T * block) instead
of O(T^2); heads that keep a long stick (logits << 0) visit every tile.

Backward (g_ij = A_ij * dA_ij, dA_ij = do_i . v_j  [ - do_i . v_i for include_current=False]):

    dz_ij = g_ij (1 - beta_ij) - beta_ij * sum_{j' < j} g_ij'
          = g_ij - beta_ij * (g_ij + G_i - S_ij),   S_ij = sum_{j' >= j} g_ij',  G_i = sum_j g_ij

with G_i = do_i . o_i (include_current) or do_i . (o_i - v_i) (remainder to the current token), so
S runs right to left like the forward carry and the pass needs nothing but o from the forward.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

BLOCK_Q = 128
BLOCK_K = 128
# exp() of arguments below ~-87 (fp32 underflow: denormal or 0) takes a slow path in the vectorised CPU
# exp, 15-30x slower; log A_ij falls far below that for distant keys. Clamp to EXP_MIN first (the
# result, <= 1.7e-38, is negligible next to the O(1) near-diagonal weights) and zero masked entries.
EXP_MIN = -87.0


def _exp_weights(x: Tensor, m: Optional[Tensor]) -> Tensor:
    """exp(x) in place (x = log A tile, -inf on masked entries) without the underflow slow path."""
    a = x.clamp_min_(EXP_MIN).exp_()
    if m is not None:
        a.masked_fill_(~m, 0.0)
    return a


def _tri(n: int, device, dtype) -> Tensor:
    """M[l, j] = 1 if l >= j: (x @ M)[..., j] = sum_{l >= j} x[..., l] (inclusive suffix sum)."""
    return torch.ones(n, n, device=device, dtype=dtype).tril_()


SUFFIX_CHUNK = 32
# stop visiting key tiles to the left once every row's log-stick prefix is this large (module docstring)
EXIT_LOG_STICK = 40.0


class _Suffix:
    """Inclusive suffix sums along the last dim of a tile, as matmuls. A full-width tile of n keys is cut
    into chunks of c: one [.., n/c, c] @ tri_c matmul for the sums inside each chunk, plus the totals of
    the chunks to the right (a tiny [.., n/c] @ strict-tri matmul): n*c multiply-adds per row instead of
    n*n. Partial tiles (fewer than n keys) use the full triangle."""

    def __init__(self, n: int, device, dtype, c: int = SUFFIX_CHUNK) -> None:
        self.n = n
        self.full = _tri(n, device, dtype)
        self.c = c if (c < n and n % c == 0) else 0
        if self.c:
            self.tri_c = _tri(c, device, dtype)
            self.strict = torch.ones(n // c, n // c, device=device, dtype=dtype).tril_(-1)  # sum over chunks to the right

    def __call__(self, x: Tensor) -> Tensor:
        w = x.shape[-1]
        if not self.c or w != self.n:
            return torch.matmul(x, self.full[:w, :w])
        nc, c = w // self.c, self.c
        r = torch.matmul(x.reshape(*x.shape[:-1], nc, c), self.tri_c)  # [.., nc, c]
        right = torch.matmul(r[..., 0], self.strict)  # [.., nc]: totals of later chunks
        return r.add_(right.unsqueeze(-1)).reshape(x.shape)


def _allowed(qpos: Tensor, ks: int, ke: int, include_current: bool, kpm_B1k: Optional[Tensor]) -> Optional[Tensor]:
    """Bool mask [.., bq, bk] of allowed (query, key) pairs in a tile, or None when all are allowed."""
    kpos = torch.arange(ks, ke, device=qpos.device)
    need_causal = (ke - 1) > (int(qpos[0]) - (0 if include_current else 1))
    m = None
    if need_causal:
        m = (kpos[None, :] <= qpos[:, None]) if include_current else (kpos[None, :] < qpos[:, None])
    if kpm_B1k is not None:
        pad = kpm_B1k[:, :, None, None, ks:ke]  # [B,1,1,1,bk]
        m = pad if m is None else (m & pad)
    return m


def _tile_logits(q_blk: Tensor, k_blk: Tensor, qpos, ks, ke, include_current, kpm):
    """z [B,Hk,g,bq,bk] (masked entries -inf) and the allowed mask (or None)."""
    z = torch.matmul(q_blk, k_blk.transpose(-1, -2).unsqueeze(2))
    m = _allowed(qpos, ks, ke, include_current, kpm)
    if m is not None:
        z = z.masked_fill(~m, float("-inf"))
    return z, m


def _key_blocks(kend: int, bk: int):
    starts = list(range(0, kend, bk))
    return [(s, min(s + bk, kend)) for s in reversed(starts)]


def _forward(q5, k, v, include_current, kpm, bq, bk):
    """q5 [B,Hk,g,Tq,d] pre-scaled by 1/sqrt(d), float; k, v [B,Hk,Tk,d] float. Returns o, rowsum(A)."""
    B, Hk, g, Tq, d = q5.shape
    Tk = k.shape[2]
    off = Tk - Tq
    o = torch.zeros_like(q5)
    asum = q5.new_zeros(B, Hk, g, Tq, 1)
    suffix = _Suffix(bk, q5.device, q5.dtype)
    for qs in range(0, Tq, bq):
        qe = min(qs + bq, Tq)
        qpos = torch.arange(off + qs, off + qe, device=q5.device)
        kend = off + qe if include_current else off + qe - 1
        q_blk = q5[:, :, :, qs:qe]
        carry = q5.new_zeros(B, Hk, g, qe - qs, 1)
        acc = o[:, :, :, qs:qe]
        for ks, ke in _key_blocks(kend, bk):
            z, m = _tile_logits(q_blk, k[:, :, ks:ke], qpos, ks, ke, include_current, kpm)
            r = suffix(F.softplus(z))  # inclusive suffix sums
            r0 = r[..., :1].clone()
            r.add_(carry)
            a = _exp_weights(torch.sub(z, r), m)  # 0 on masked entries
            acc.add_(torch.matmul(a, v[:, :, None, ks:ke]))
            if not include_current:  # row sums of A are only needed for the remainder
                asum[:, :, :, qs:qe].add_(a.sum(-1, keepdim=True))
            carry.add_(r0)
            if float(carry.min()) >= EXIT_LOG_STICK:
                break
    return o, asum


def _backward(q5, k, v, o5, do5, include_current, kpm, bq, bk):
    B, Hk, g, Tq, d = q5.shape
    Tk = k.shape[2]
    off = Tk - Tq
    dq = torch.zeros_like(q5)
    dk = torch.zeros_like(k)
    dv = torch.zeros_like(v)
    suffix = _Suffix(bk, q5.device, q5.dtype)
    if include_current:
        G = (do5 * o5).sum(-1, keepdim=True)
    else:
        v_cur = v[:, :, None, off:]
        G = (do5 * (o5 - v_cur)).sum(-1, keepdim=True)
        dov_cur = (do5 * v_cur).sum(-1, keepdim=True)  # do_i . v_i, subtracted from every dA_ij
    for qs in range(0, Tq, bq):
        qe = min(qs + bq, Tq)
        n = qe - qs
        qpos = torch.arange(off + qs, off + qe, device=q5.device)
        kend = off + qe if include_current else off + qe - 1
        q_blk, do_blk = q5[:, :, :, qs:qe], do5[:, :, :, qs:qe]
        G_blk = G[:, :, :, qs:qe]
        carry = q5.new_zeros(B, Hk, g, n, 1)
        gcarry = q5.new_zeros(B, Hk, g, n, 1)
        dq_blk = dq[:, :, :, qs:qe]
        for ks, ke in _key_blocks(kend, bk):
            k_blk, v_blk = k[:, :, ks:ke], v[:, :, ks:ke]
            z, m = _tile_logits(q_blk, k_blk, qpos, ks, ke, include_current, kpm)
            r = suffix(F.softplus(z))
            r0 = r[..., :1].clone()
            r.add_(carry)
            a = _exp_weights(torch.sub(z, r), m)
            carry.add_(r0)
            dA = torch.matmul(do_blk, v_blk.transpose(-1, -2).unsqueeze(2))
            if not include_current:
                dA.sub_(dov_cur[:, :, :, qs:qe])
            gr = dA.mul_(a)  # g = A * dA (0 where masked)
            s = suffix(gr)
            s0 = s[..., :1].clone()
            s.add_(gcarry)  # S_ij = sum_{j' >= j} g_ij'
            gcarry.add_(s0)
            beta = torch.sigmoid(z)
            # dz = g - beta * (g + G - S)
            dz = torch.sub(gr, beta.mul_(s.neg_().add_(gr).add_(G_blk)))
            dq_blk.add_(torch.matmul(dz, k_blk.unsqueeze(2)))
            if g == 1:  # no sum over the query heads of a key head
                dk[:, :, ks:ke].add_(torch.matmul(dz[:, :, 0].transpose(-1, -2), q_blk[:, :, 0]))
                dv[:, :, ks:ke].add_(torch.matmul(a[:, :, 0].transpose(-1, -2), do_blk[:, :, 0]))
            else:
                dk[:, :, ks:ke].add_(torch.matmul(dz.transpose(-1, -2), q_blk).sum(2))
                dv[:, :, ks:ke].add_(torch.matmul(a.transpose(-1, -2), do_blk).sum(2))
            if float(carry.min()) >= EXIT_LOG_STICK:
                break
    return dq, dk, dv


def blockwise_forward(q: Tensor, k: Tensor, v: Tensor, include_current: bool, kpm: Optional[Tensor], bq: int,
                      bk: int) -> tuple[Tensor, Tensor]:
    """(o [B,Hq,Tq,d], rem [B,Hq,Tq]: the stick left to the current token, empty when include_current),
    both in the compute dtype: fp32 for bf16/fp16 inputs, fp64 for fp64. The caller casts o; the backward
    takes this o, since G_i = do_i . o_i from a bf16-rounded o would put its rounding into every dz."""
    B, Hq, Tq, d = q.shape
    Hk, Tk = k.shape[1], k.shape[2]
    g = Hq // Hk
    q5, kf, vf, kpm_B1 = _prepare(q, k, v, kpm)
    o5, asum = _forward(q5, kf, vf, include_current, kpm_B1, bq, bk)
    if include_current:
        return o5.reshape(B, Hq, Tq, d), o5.new_empty(0)
    rem = (1.0 - asum).clamp_min(0.0)
    o5 = o5 + rem * vf[:, :, None, Tk - Tq :]
    return o5.reshape(B, Hq, Tq, d), rem.reshape(B, Hk * g, Tq)


def blockwise_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, rem: Tensor, include_current: bool,
                       kpm: Optional[Tensor], bq: int, bk: int) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of `blockwise_forward`'s o (given in the compute dtype), in the inputs' dtypes."""
    B, Hq, Tq, d = q.shape
    Hk, Tk = k.shape[1], k.shape[2]
    g = Hq // Hk
    q5, kf, vf, kpm_B1 = _prepare(q, k, v, kpm)
    o5 = o.to(q5.dtype).reshape(B, Hk, g, Tq, d)
    do5 = do.to(q5.dtype).contiguous().reshape(B, Hk, g, Tq, d)  # .sum() gives a stride-0 grad
    dq5, dk, dv = _backward(q5, kf, vf, o5, do5, include_current, kpm_B1, bq, bk)
    if not include_current:  # o_i += rem_i v_i
        dv[:, :, Tk - Tq :].add_((rem.to(q5.dtype).reshape(B, Hk, g, Tq, 1) * do5).sum(2))
    dq = (dq5 * (1.0 / math.sqrt(d))).reshape(B, Hq, Tq, d).to(q.dtype)
    return dq, dk.to(k.dtype), dv.to(v.dtype)


def _prepare(q: Tensor, k: Tensor, v: Tensor, kpm: Optional[Tensor]):
    B, Hq, Tq, d = q.shape
    Hk = k.shape[1]
    cdt = torch.promote_types(q.dtype, torch.float32)  # fp32 math for bf16/fp16, fp64 stays fp64
    q5 = (q.to(cdt) * (1.0 / math.sqrt(d))).view(B, Hk, Hq // Hk, Tq, d)
    return q5, k.to(cdt), v.to(cdt), None if kpm is None else kpm.bool()[:, None]


def stickbreaking_blockwise(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    include_current: bool = True,
    key_padding_mask: Optional[Tensor] = None,
    block_q: int = BLOCK_Q,
    block_k: int = BLOCK_K,
) -> Tensor:
    """Same contract as `stickbreaking_reference`; block-wise forward and hand-written backward (through the
    `molm_ds::stickbreaking` op, so it has one autograd formula with the Triton path)."""
    from molm_ds.ops.stickbreaking import stickbreaking_op

    return stickbreaking_op(q, k, v, include_current=include_current, key_padding_mask=key_padding_mask,
                            triton=False, block_q=block_q, block_k=block_k)
