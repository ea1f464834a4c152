"""Differentiable variable-split all-to-all (`torch.distributed.all_to_all_single`).

Legend: N rows, D width, P ranks in the group. `in_splits[q]` rows of x go to rank q (in rank order);
`out_splits[q]` rows arrive from rank q. The backward is the reverse exchange (splits swapped), so
gradients of the rows a rank sent come back to it. gloo supports uneven splits here (it has no
list `all_to_all`). Every rank must call this the same number of times in the same order; a rank
with nothing to send or receive passes empty splits but still takes part.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["all_to_all_variable", "exchange_counts"]


def _exchange(x_ND: Tensor, out_splits: Sequence[int], in_splits: Sequence[int], group) -> Tensor:
    x_ND = x_ND.contiguous()
    out = x_ND.new_empty((int(sum(out_splits)),) + tuple(x_ND.shape[1:]))
    dist.all_to_all_single(out, x_ND, output_split_sizes=list(out_splits), input_split_sizes=list(in_splits), group=group)
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND: Tensor, out_splits: list, in_splits: list, group) -> Tensor:
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        return _exchange(x_ND, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad_ND: Tensor):
        # Reverse exchange: what came from rank q goes back to rank q.
        return _exchange(grad_ND, ctx.in_splits, ctx.out_splits, ctx.group), None, None, None


def all_to_all_variable(x_ND: Tensor, *, out_splits: Sequence[int], in_splits: Sequence[int], group=None) -> Tensor:
    """Send `in_splits[q]` consecutive rows of `x_ND` to rank q of `group`; return the rows received,
    `out_splits[q]` from rank q, in rank order. Differentiable in `x_ND`.

    Under torch.compile the split sizes are symbolic (unbacked) integers read from the device: the
    exchange is then torch's traceable functional collective (its own autograd runs the reverse
    exchange), so the graph does not break here."""
    if torch.compiler.is_compiling():
        from torch.distributed import _functional_collectives as fc

        torch._check(sum(in_splits) == x_ND.shape[0])
        return fc.all_to_all_single_autograd(x_ND.contiguous(), list(out_splits), list(in_splits), group)
    if sum(in_splits) != x_ND.shape[0]:
        raise ValueError(f"all_to_all_variable: in_splits sum to {sum(in_splits)} but x has {x_ND.shape[0]} rows")
    return _AllToAll.apply(x_ND, list(map(int, out_splits)), list(map(int, in_splits)), group)


def exchange_counts(send_counts_PE: Tensor, group=None) -> Tensor:
    """send_counts_PE[q, e]: rows this rank sends to local expert e of rank q. Returns
    recv_counts_PE[q, e]: rows rank q sends to this rank's local expert e. Not differentiable."""
    send = send_counts_PE.contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv
