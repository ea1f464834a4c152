"""Local (single-process, ep_size = 1) token dispatch: permute rows into expert order and back.

Legend: T tokens, K slots per token, D width, E experts, N kept slots (idx >= 0), grouped by expert.

    x_ND, counts_E, ctx = dispatcher.dispatch(x, idx_TK)   # x: [T, D] (same row for every slot) or [T, K, D]
    y_ND = experts(x_ND, counts_E)
    y_TKD = dispatcher.undispatch(y_ND, ctx)                # zeros where idx_TK == -1
    y_TD = (weights_TK[..., None] * y_TKD).sum(1)            # gates are applied by the layer

Within an expert, rows keep token-major order (token t slot s before token t' > t), so the
expert-parallel dispatcher can reproduce the exact same grouping. `LocalDispatcher` is a plain object
(not an nn.Module): any object with `dispatch` / `undispatch` can replace it on a layer.

Fast path (LocalDispatcher only): `combine(y_ND, weights_TK, ctx) -> y_TD` fuses undispatch and the
gate-weighted sum (rows scaled by their gate, one `index_add_` into y_TD; hand-written backward), so no
[T, K, D] tensor is built. It equals `(weights_TK[..., None] * undispatch(y_ND, ctx)).sum(1)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


@dataclass
class DispatchContext:
    order_N: Tensor  # flat slot index (t * K + s) of each dispatched row, in expert order
    T: int
    K: int
    token_N: Optional[Tensor] = None  # order_N // K (token of each row), kept for combine


class _LocalCombine(torch.autograd.Function):
    """y_TD[t] = sum over rows n of token t of w_N[n] * y_ND[n], w_N = weights_TK.flatten()[order_N]."""

    @staticmethod
    def forward(ctx, y_ND: Tensor, weights_TK: Tensor, order_N: Tensor, token_N: Tensor, T: int) -> Tensor:
        w_N = weights_TK.reshape(-1).index_select(0, order_N).to(y_ND.dtype)
        out = y_ND.new_zeros(T, y_ND.shape[1])
        out.index_add_(0, token_N, y_ND * w_N[:, None])
        ctx.save_for_backward(y_ND, w_N, order_N, token_N)
        ctx.wshape, ctx.wdtype = weights_TK.shape, weights_TK.dtype
        return out

    @staticmethod
    def backward(ctx, dy_TD: Tensor):
        y_ND, w_N, order_N, token_N = ctx.saved_tensors
        dy_ND = dy_TD.index_select(0, token_N)  # gradient of each row's token
        dw = None
        if ctx.needs_input_grad[1]:
            dw_N = torch.linalg.vecdot(dy_ND, y_ND)
            dw = dw_N.new_zeros(ctx.wshape.numel()).index_copy_(0, order_N, dw_N)  # dropped slots: 0
            dw = dw.view(ctx.wshape).to(ctx.wdtype)
        dy = dy_ND.mul_(w_N[:, None]) if ctx.needs_input_grad[0] else None
        return dy, dw, None, None, None


def check_dispatch_args(x: Tensor, idx_TK: Tensor, num_experts: int) -> None:
    """Shape and expert-id checks shared by every dispatcher: x is [T, D] or [T, K, D]; ids < num_experts."""
    T, K = idx_TK.shape
    if x.dim() not in (2, 3) or x.shape[0] != T or (x.dim() == 3 and x.shape[1] != K):
        raise ValueError(f"dispatch: x must be [T, D] or [T, K, D] with T={T}, K={K}; got {tuple(x.shape)}")
    if idx_TK.numel() and int(idx_TK.max()) >= num_experts:
        raise ValueError(f"dispatch: expert id {int(idx_TK.max())} >= num_experts={num_experts}")


def permute_by_expert(idx_TK: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    """Sort slots by expert, keeping token-major order within an expert; dropped slots (-1) removed.
    Returns (order_N: flat slot ids in expert order, counts_E)."""
    flat = idx_TK.reshape(-1)
    valid = flat >= 0
    key = torch.where(valid, flat, torch.full_like(flat, num_experts))  # dropped slots sort last
    order = torch.argsort(key, stable=True)
    counts_E = torch.bincount(flat[valid], minlength=num_experts)
    return order[: int(counts_E.sum())], counts_E


class LocalDispatcher:
    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts

    def __repr__(self) -> str:
        return f"LocalDispatcher(num_experts={self.num_experts})"

    def dispatch(self, x: Tensor, idx_TK: Tensor):
        T, K = idx_TK.shape
        check_dispatch_args(x, idx_TK, self.num_experts)
        order_N, counts_E = permute_by_expert(idx_TK, self.num_experts)
        token_N = order_N // K
        # index_select: its backward is one index_add_ (cheaper than index_put with accumulate)
        x_ND = x.index_select(0, token_N) if x.dim() == 2 else x.reshape(T * K, x.shape[-1]).index_select(0, order_N)
        return x_ND, counts_E, DispatchContext(order_N, T, K, token_N)

    def undispatch(self, y_ND: Tensor, ctx: DispatchContext) -> Tensor:
        n_slots = ctx.T * ctx.K
        # every slot is overwritten when nothing was dropped: no zero-fill needed then
        out = y_ND.new_empty(n_slots, y_ND.shape[-1]) if y_ND.shape[0] == n_slots else y_ND.new_zeros(n_slots, y_ND.shape[-1])
        out.index_copy_(0, ctx.order_N, y_ND)  # in place on a fresh tensor: autograd records it
        return out.view(ctx.T, ctx.K, y_ND.shape[-1])

    def combine(self, y_ND: Tensor, weights_TK: Tensor, ctx: DispatchContext) -> Tensor:
        """Fused undispatch + gate-weighted sum: y_TD = sum_k weights_TK[:, k] * y_TKD[:, k]."""
        token_N = ctx.token_N if ctx.token_N is not None else ctx.order_N // ctx.K
        if tuple(weights_TK.shape) != (ctx.T, ctx.K) or y_ND.shape[0] != ctx.order_N.shape[0]:
            raise ValueError(f"combine: weights {tuple(weights_TK.shape)} / rows {y_ND.shape[0]} do not match the dispatch (T={ctx.T}, K={ctx.K}, N={ctx.order_N.shape[0]})")
        return _LocalCombine.apply(y_ND, weights_TK, ctx.order_N, token_N, ctx.T)
