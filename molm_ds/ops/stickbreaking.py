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
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from molm_ds.ops.backend import use_triton
from molm_ds.ops.stickbreaking_cpu import stickbreaking_blockwise


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
    z = torch.matmul(q.float(), kq.float().transpose(-1, -2)) / math.sqrt(d)  # [B,Hq,Tq,Tk]
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
    o = torch.matmul(a, vq.float())
    if not include_current:
        rem = (1.0 - a.sum(-1, keepdim=True)).clamp_min(0.0)
        o = o + rem * vq[:, :, Tk - Tq :, :].float()
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

    Triton kernels for CUDA tensors (MOLM_DS_KERNELS=auto|triton; a one-query decode kernel when
    Tq = 1 and no gradient is needed), otherwise the block-wise PyTorch path with a hand-written
    backward (`stickbreaking_cpu`), which never builds a [Tq, Tk] tensor.
    """
    _check(q, k, v)
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (q.shape[0], k.shape[2]):
        raise ValueError(f"stickbreaking: key_padding_mask must be [B, Tk] = [{q.shape[0]}, {k.shape[2]}], got {tuple(key_padding_mask.shape)}")
    if use_triton(q):
        from kernels.stickbreaking import stickbreaking_triton

        return stickbreaking_triton(q, k, v, include_current=include_current, key_padding_mask=key_padding_mask)
    return stickbreaking_blockwise(q, k, v, include_current=include_current, key_padding_mask=key_padding_mask)
