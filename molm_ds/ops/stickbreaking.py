"""Stick-breaking attention (ModuleFormer / arXiv 2306.04640, and arXiv 2410.17980).

Legend: B = batch, Hq = query heads, Hk = key/value heads (Hq % Hk == 0, query head h reads key head
h // (Hq // Hk)), Tq = queries, Tk = keys (Tq <= Tk; query i sits at absolute position Tk - Tq + i),
d = head dim.

    z_ij = q_i . k_j / sqrt(d),   beta_ij = sigmoid(z_ij)
    A_ij = beta_ij * prod_{j < l <= i} (1 - beta_il)          (broken from the current token backwards)
    log A_ij = z_ij - softplus(z_ij) - sum_{j < l <= i} softplus(z_il)

include_current=True (MoLM): keys j <= i, the leftover mass 1 - sum_j A_ij is dropped.
include_current=False (2410.17980): keys j < i, o_i += (1 - sum_j A_ij) v_i.
Padding keys (key_padding_mask False) get z = -inf: weight 0 and they break nothing.

`stickbreaking_attention` is one ``torch.library.custom_op``, ``molm_ds::stickbreaking`` (outputs o, the
remainder rem and the Triton forward's per-query-block stop table), with ``register_autograd`` (its
backward is ``molm_ds::stickbreaking_backward``) and ``register_fake``; ``molm_ds::stickbreaking_decode``
is the Triton one-query decode (inference only). The backend switch picks the Triton kernels
(``molm_ds.kernels.stickbreaking``) or the block-wise PyTorch path (``stickbreaking_cpu``); both exit
early once every row's stick is spent, and both never build a [Tq, Tk] tensor.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from molm_ds.ops.backend import use_triton
from molm_ds.ops.stickbreaking_cpu import BLOCK_K, BLOCK_Q, EXIT_LOG_STICK, blockwise_backward, blockwise_forward

__all__ = ["stickbreaking_attention", "stickbreaking_op", "stickbreaking_reference"]


def _check(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise ValueError(f"stickbreaking: need q [B,Hq,Tq,d], k = v [B,Hk,Tk,d]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] or q.shape[1] % k.shape[1] or q.shape[2] > k.shape[2]:
        raise ValueError(f"stickbreaking: q {tuple(q.shape)} does not fit k/v {tuple(k.shape)}")


def stickbreaking_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    include_current: bool = True,
    key_padding_mask: Optional[Tensor] = None,
) -> Tensor:
    """O(Tq*Tk) reference in log space with a reverse cumulative sum. Returns o [B,Hq,Tq,d]."""
    _check(q, k, v)
    B, Hq, Tq, d = q.shape
    Hk, Tk = k.shape[1], k.shape[2]
    g = Hq // Hk
    kq = k.repeat_interleave(g, dim=1) if g > 1 else k
    vq = v.repeat_interleave(g, dim=1) if g > 1 else v
    cdt = torch.promote_types(q.dtype, torch.float32)
    z = torch.matmul(q.to(cdt), kq.to(cdt).transpose(-1, -2)) / math.sqrt(d)  # [B,Hq,Tq,Tk]
    qpos = torch.arange(Tk - Tq, Tk, device=q.device)[:, None]
    kpos = torch.arange(Tk, device=q.device)[None, :]
    allowed = kpos <= qpos if include_current else kpos < qpos  # [Tq,Tk]
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :].bool()
    z = z.masked_fill(~allowed, float("-inf"))
    sp = F.softplus(z)  # softplus(-inf) = 0: masked keys break nothing
    # sum_{j < l <= i} softplus(z_il) = (reverse cumsum over l >= j) - softplus(z_ij)
    rev = torch.flip(torch.cumsum(torch.flip(sp, [-1]), -1), [-1]) - sp
    log_a = z - sp - rev
    a = torch.exp(log_a)  # exp(-inf) = 0 on masked entries
    o = torch.matmul(a, vq.to(cdt))
    if not include_current:
        rem = (1.0 - a.sum(-1, keepdim=True)).clamp_min(0.0)
        o = o + rem * vq[:, :, Tk - Tq :, :].to(cdt)
    return o.to(q.dtype)


# ---- molm_ds::stickbreaking ---------------------------------------------------------------------
@torch.library.custom_op("molm_ds::stickbreaking", mutates_args=())
def _sb_op(q: Tensor, k: Tensor, v: Tensor, kpm: Optional[Tensor], include_current: bool, block_q: int, block_k: int,
           triton: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(o; rem: the current token's share [B,Hq,Tq], empty when include_current; stop: the last key block
    each Triton query block visited, empty on the PyTorch path). o is in q's dtype on the Triton path,
    in the compute dtype (fp32 for bf16) on the PyTorch path, whose backward needs it exact (the caller
    casts it). Block sizes are the PyTorch path's."""
    if triton:
        from molm_ds.kernels.stickbreaking import launch

        return launch.forward(q.contiguous(), k.contiguous(), v.contiguous(), kpm, include_current, EXIT_LOG_STICK)
    o, rem = blockwise_forward(q, k, v, include_current, kpm, block_q, block_k)
    return o, rem, q.new_empty(0, dtype=torch.int32)


@_sb_op.register_fake
def _(q, k, v, kpm, include_current, block_q, block_k, triton):
    B, Hq, Tq, d = q.shape
    cdt = torch.promote_types(q.dtype, torch.float32)
    rem = q.new_empty(0, dtype=cdt) if include_current else q.new_empty(B, Hq, Tq, dtype=cdt)
    if not triton:
        return q.new_empty(q.shape, dtype=cdt), rem, q.new_empty(0, dtype=torch.int32)
    from molm_ds.kernels.stickbreaking import blocks_for

    bm = blocks_for(d, q.dtype, q.is_cuda).BM
    return torch.empty_like(q), rem, q.new_empty(B * Hq, (Tq + bm - 1) // bm, dtype=torch.int32)


@torch.library.custom_op("molm_ds::stickbreaking_backward", mutates_args=())
def _sb_backward_op(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, rem: Tensor, stop: Tensor,
                    kpm: Optional[Tensor], include_current: bool, block_q: int, block_k: int,
                    triton: bool) -> tuple[Tensor, Tensor, Tensor]:
    if triton:
        from molm_ds.kernels.stickbreaking import launch

        return launch.backward(do, q.contiguous(), k.contiguous(), v.contiguous(), o, rem, stop, kpm, include_current)
    return blockwise_backward(do, q, k, v, o, rem, include_current, kpm, block_q, block_k)


@_sb_backward_op.register_fake
def _(do, q, k, v, o, rem, stop, kpm, include_current, block_q, block_k, triton):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _sb_setup(ctx, inputs, output):
    q, k, v, kpm, include_current, block_q, block_k, triton = inputs
    o, rem, stop = output
    ctx.save_for_backward(q, k, v, o, rem, stop, kpm)
    ctx.cfg = (include_current, block_q, block_k, triton)


def _sb_backward(ctx, do, _drem, _dstop):
    q, k, v, o, rem, stop, kpm = ctx.saved_tensors
    include_current, block_q, block_k, triton = ctx.cfg
    dq, dk, dv = torch.ops.molm_ds.stickbreaking_backward(do, q, k, v, o, rem, stop, kpm, include_current,
                                                          block_q, block_k, triton)
    return dq, dk, dv, None, None, None, None, None


_sb_op.register_autograd(_sb_backward, setup_context=_sb_setup)


@torch.library.custom_op("molm_ds::stickbreaking_decode", mutates_args=())
def _sb_decode_op(q: Tensor, k: Tensor, v: Tensor, kpm: Optional[Tensor], include_current: bool) -> Tensor:
    from molm_ds.kernels.stickbreaking import launch

    return launch.decode(q.contiguous(), k.contiguous(), v.contiguous(), kpm, include_current)


@_sb_decode_op.register_fake
def _(q, k, v, kpm, include_current):
    return torch.empty_like(q)


def stickbreaking_op(q: Tensor, k: Tensor, v: Tensor, *, include_current: bool, key_padding_mask: Optional[Tensor],
                     triton: bool, block_q: int = BLOCK_Q, block_k: int = BLOCK_K) -> Tensor:
    """The op with the path chosen by the caller (``stickbreaking_attention`` asks the backend switch)."""
    kpm = None if key_padding_mask is None else key_padding_mask.bool()
    o, _, _ = torch.ops.molm_ds.stickbreaking(q, k, v, kpm, include_current, block_q, block_k, triton)
    return o.to(q.dtype)


def stickbreaking_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    include_current: bool = True,
    key_padding_mask: Optional[Tensor] = None,
) -> Tensor:
    """Stick-breaking attention; same contract as `stickbreaking_reference`.

    Triton kernels for CUDA tensors (MOLM_DS_KERNELS=auto|triton; the one-query decode kernel when
    Tq = 1 and no gradient is needed), otherwise the block-wise PyTorch path (`stickbreaking_cpu`).
    """
    _check(q, k, v)
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (q.shape[0], k.shape[2]):
        raise ValueError(f"stickbreaking: key_padding_mask must be [B, Tk] = [{q.shape[0]}, {k.shape[2]}], got {tuple(key_padding_mask.shape)}")
    triton = use_triton(q)
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if triton and q.shape[2] == 1 and not needs_grad:
        kpm = None if key_padding_mask is None else key_padding_mask.bool()
        return torch.ops.molm_ds.stickbreaking_decode(q, k, v, kpm, include_current)
    return stickbreaking_op(q, k, v, include_current=include_current, key_padding_mask=key_padding_mask, triton=triton)
