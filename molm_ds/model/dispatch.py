"""Token dispatch: the contract every dispatcher implements, and the local (ep_size 1) reference.

Legend: T tokens, K slots per token, D width, E experts (local experts under expert parallelism),
N rows after permutation (kept slots, grouped by expert).

The contract (the all-to-all dispatcher in ``molm_ds.parallel.dispatch`` implements the same four):

    plan = dispatcher.plan(idx_TK, dropless=...)        # route once: sort slots by expert, count rows
    x_ND = dispatcher.dispatch(x, plan)                  # x: [T, D] (same row for every slot) or [T, K, D]
    y_ND = experts(x_ND, plan.counts)                    # rows grouped by expert, plan.counts rows each
    y_TKD = dispatcher.undispatch(y_ND, plan)            # back to slots; zeros where idx_TK == -1
    y_TD = dispatcher.combine(y_ND, weights_TK, plan)    # fused undispatch + gate-weighted sum

A plan is made once per routing decision and reused by every dispatch of it (the attention layer
dispatches its queries and its attention outputs with one plan). ``plan.token_slots`` is the kept slot
ids in expert order when the rows never leave this process (the local plan), None when they travel
(all-to-all): with it an MLP's experts read x in token order and write the gate-weighted sum
themselves (``MLPExperts.forward_tokens``), which skips the dispatch copy and the combine pass. Within an expert, rows keep
token-major order (slot (t, s) before (t', s') iff t*K+s < t'*K+s'), so the expert-parallel dispatcher
reproduces the exact same grouping. Layers never look at the dispatcher's type.

Deterministic mode (``torch.are_deterministic_algorithms_enabled()``, set by ``training.deterministic``): the
two reductions over a token's K slots -- the combine, and the backward of dispatching a [T, D] input -- run as
a scatter to distinct slot rows (``index_copy_``) followed by a sum over K in slot order, never as an
``index_add_`` with repeated indices (atomics on CUDA: run-to-run different sums). Same signatures, same
values up to summation order (tests/model/test_deterministic_dispatch.py).

Host syncs: none when the plan is dropless (no padding mask, no capacity drops: N = T*K is known);
otherwise one, to learn N. Expert-id range checks read tensor values and run only under
``MOLM_DS_DEBUG=1``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from molm_ds.errors import debug_enabled
from molm_ds.ops.grouped_gemm import GroupCounts

__all__ = ["DispatchPlan", "LocalDispatcher", "LocalPlan", "check_dispatch_args", "combine_reference",
           "expert_counts", "gather_token_rows", "permute_by_expert", "weighted_combine"]


@dataclass
class DispatchPlan:
    """What every plan carries: rows per (local) expert, and the routing shape."""

    counts: GroupCounts  # rows of each local expert in the dispatched order
    T: int
    K: int

    @property
    def counts_E(self) -> Tensor:
        return self.counts.tensor

    @property
    def token_slots(self) -> Optional[Tensor]:
        """Slot ids (t * K + s) of the rows in expert order when the rows stay in this process, else None."""
        return None


@dataclass
class LocalPlan(DispatchPlan):
    order_N: Tensor = None  # flat slot id (t * K + s) of each dispatched row, in expert order
    token_N: Tensor = None  # order_N // K: the token of each row

    @property
    def token_slots(self) -> Optional[Tensor]:
        return self.order_N


class _WeightedCombine(torch.autograd.Function):
    """y_TD[t] = sum over rows n of token t of w_N[n] * y_ND[n], w_N = weights_TK.flatten()[order_N]."""

    @staticmethod
    def forward(ctx, y_ND: Tensor, weights_TK: Tensor, order_N: Tensor, token_N: Tensor, T: int) -> Tensor:
        w_N = weights_TK.reshape(-1).index_select(0, order_N).to(y_ND.dtype)
        if torch.are_deterministic_algorithms_enabled():  # distinct slot rows, then the K slots summed in order
            K = weights_TK.shape[1]
            out = y_ND.new_zeros(T * K, y_ND.shape[1]).index_copy_(0, order_N, y_ND * w_N[:, None])
            out = out.view(T, K, y_ND.shape[1]).sum(1)
        else:
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


def weighted_combine(y_ND: Tensor, weights_TK: Tensor, order_N: Tensor, token_N: Tensor) -> Tensor:
    """Rows in slot order ``order_N`` -> y_TD = sum_k weights_TK[t, k] * row of slot (t, k); no [T, K, D]
    tensor is built (one ``index_add_``; hand-written backward)."""
    T, K = weights_TK.shape
    if y_ND.shape[0] != order_N.shape[0]:
        raise ValueError(f"combine: {y_ND.shape[0]} rows do not match the plan's {order_N.shape[0]} dispatched slots "
                         f"(T={T}, K={K})")
    return _WeightedCombine.apply(y_ND, weights_TK, order_N, token_N, T)


class _GatherTokens(torch.autograd.Function):
    """x_TD.index_select(0, token_N) whose backward scatters to distinct slot rows and sums each token's K
    slots in order (the plain backward is an ``index_add_`` with each token repeated up to K times)."""

    @staticmethod
    def forward(ctx, x_TD: Tensor, order_N: Tensor, token_N: Tensor, K: int) -> Tensor:
        ctx.save_for_backward(order_N)
        ctx.shape = (x_TD.shape[0], K)
        return x_TD.index_select(0, token_N)

    @staticmethod
    def backward(ctx, dy_ND: Tensor):
        (order_N,) = ctx.saved_tensors
        T, K = ctx.shape
        dx = dy_ND.new_zeros(T * K, dy_ND.shape[1]).index_copy_(0, order_N, dy_ND).view(T, K, dy_ND.shape[1]).sum(1)
        return dx, None, None, None


def gather_token_rows(x_TD: Tensor, order_N: Tensor, token_N: Tensor, K: int) -> Tensor:
    """The row of each dispatched slot's token (``token_N = order_N // K``); in deterministic mode with an
    atomic-free backward (``_GatherTokens``)."""
    if torch.are_deterministic_algorithms_enabled() and x_TD.requires_grad:
        return _GatherTokens.apply(x_TD, order_N, token_N, K)
    # index_select: its backward is one index_add_ (cheaper than index_put with accumulate)
    return x_TD.index_select(0, token_N)


def combine_reference(weights_TK: Tensor, y_TKD: Tensor) -> Tensor:
    """The slow path of ``combine``: y_TD = sum_k weights_TK[:, k] * y_TKD[:, k]."""
    return (weights_TK.to(y_TKD.dtype)[..., None] * y_TKD).sum(1)


def check_dispatch_args(idx_TK: Tensor, num_experts: int) -> None:
    """Shape checks (free) and, under ``MOLM_DS_DEBUG=1``, the expert-id range (reads values: a host sync)."""
    if idx_TK.dim() != 2 or idx_TK.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"dispatch: idx_TK must be an integer [T, K] tensor; got {idx_TK.dtype} {tuple(idx_TK.shape)}")
    if debug_enabled() and idx_TK.numel():
        lo, hi = int(idx_TK.min()), int(idx_TK.max())
        if hi >= num_experts or lo < -1:
            raise ValueError(f"dispatch: expert ids span [{lo}, {hi}]; valid are -1 (dropped) and 0..{num_experts - 1}")


def check_rows(x: Tensor, plan: DispatchPlan) -> None:
    if x.dim() not in (2, 3) or x.shape[0] != plan.T or (x.dim() == 3 and x.shape[1] != plan.K):
        raise ValueError(f"dispatch: x must be [T, D] or [T, K, D] with T={plan.T}, K={plan.K}; got {tuple(x.shape)}")


def permute_by_expert(idx_TK: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    """Sort slots by expert, keeping token-major order within an expert. Returns (order: all T*K flat
    slot ids in expert order, dropped slots (-1) last; counts_E). The kept slots are the first
    ``counts_E.sum()`` of ``order``: no host sync here."""
    flat = idx_TK.reshape(-1)
    # dropped slots sort last; so do ids out of range (only MOLM_DS_DEBUG=1 checks them: a host read),
    # which the fixed-size count below could not hold
    valid = (flat >= 0) & (flat < num_experts)
    key = torch.where(valid, flat, torch.full_like(flat, num_experts))
    order = torch.argsort(key, stable=True)
    counts_E = expert_counts(key, num_experts + 1)[:num_experts]
    return order, counts_E


def expert_counts(idx: Tensor, num_experts: int) -> Tensor:
    """How many entries of ``idx`` (any shape, values in 0..num_experts-1) name each expert: int64 [E].
    A ``scatter_add_`` into a fixed-size tensor, not ``bincount`` (whose output size depends on the
    values, so it waits for the GPU)."""
    flat = idx.reshape(-1)
    return torch.zeros(num_experts, dtype=torch.int64, device=idx.device).scatter_add_(
        0, flat.long(), torch.ones_like(flat, dtype=torch.int64))


class LocalDispatcher:
    """Reference dispatcher over ``num_experts`` experts held in this process. A plain object, not an
    nn.Module, so expert parallelism can assign a replacement of any type to ``layer.dispatcher``."""

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts

    def __repr__(self) -> str:
        return f"LocalDispatcher(num_experts={self.num_experts})"

    def plan(self, idx_TK: Tensor, *, dropless: bool = False) -> LocalPlan:
        """``dropless``: the caller guarantees no slot is -1 (no padding mask, no capacity drops), which
        spares the host sync that counting the kept slots needs."""
        check_dispatch_args(idx_TK, self.num_experts)
        T, K = idx_TK.shape
        order, counts_E = permute_by_expert(idx_TK, self.num_experts)
        if dropless:
            counts = GroupCounts(counts_E)
        else:
            counts = GroupCounts(counts_E, counts_E.tolist())  # syncs: N is needed to cut the dropped slots
            order = order[: sum(counts.host())]
        return LocalPlan(counts, T, K, order_N=order, token_N=order // K)

    def dispatch(self, x: Tensor, plan: LocalPlan) -> Tensor:
        check_rows(x, plan)
        if x.dim() == 2:
            return gather_token_rows(x, plan.order_N, plan.token_N, plan.K)
        return x.reshape(plan.T * plan.K, x.shape[-1]).index_select(0, plan.order_N)

    def undispatch(self, y_ND: Tensor, plan: LocalPlan) -> Tensor:
        n_slots = plan.T * plan.K
        # every slot is overwritten when nothing was dropped: no zero-fill needed then
        full = plan.order_N.shape[0] == n_slots
        out = y_ND.new_empty(n_slots, y_ND.shape[-1]) if full else y_ND.new_zeros(n_slots, y_ND.shape[-1])
        out.index_copy_(0, plan.order_N, y_ND)  # in place on a fresh tensor: autograd records it
        return out.view(plan.T, plan.K, y_ND.shape[-1])

    def combine(self, y_ND: Tensor, weights_TK: Tensor, plan: LocalPlan) -> Tensor:
        """y_TD = sum_k weights_TK[:, k] * undispatch(y_ND)[:, k], fused."""
        if tuple(weights_TK.shape) != (plan.T, plan.K):
            raise ValueError(f"combine: weights {tuple(weights_TK.shape)} do not match the plan (T={plan.T}, K={plan.K})")
        return weighted_combine(y_ND, weights_TK, plan.order_N, plan.token_N)
