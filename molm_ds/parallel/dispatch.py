"""Expert-parallel token dispatch: the all-to-all twin of `molm_ds.model.LocalDispatcher`.

Legend: T tokens, K slots per token, D width, E global experts, P = ep_size ranks, E_l = E / P local
experts (rank p owns global ids p*E_l .. (p+1)*E_l - 1), N_s rows this rank sends, N rows it receives.

Same contract as the local dispatcher (`molm_ds.model.dispatch`): plan / dispatch / undispatch /
combine. Stages (the same sequence of collectives on every rank whatever the routing):
    plan:     sort this rank's slots by global expert (stable, token-major; -1 slots last)
              -> exchange counts (all_to_all_single of [P, E_l] int64 counts, on the device)
              -> ONE host transfer of the sent and received counts: the split sizes that a
                 variable-split all-to-all needs on the host, and the local experts' row counts
    dispatch: gather the sent rows -> all-to-all (variable splits, differentiable)
              -> regroup the received rows by local expert (then source rank, then token)
    == experts compute on x_ND with plan.counts ==
    undispatch: undo the regroup -> reverse all-to-all -> unpermute into y_TKD (zeros for dropped slots)
    combine:    undo the regroup -> reverse all-to-all -> fused unpermute + gate-weighted sum
One plan serves every dispatch of one routing decision (the attention layer's queries and outputs),
so a layer sorts once and exchanges counts once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from molm_ds.config import check_expert_split
from molm_ds.model.dispatch import (
    DispatchPlan, check_dispatch_args, check_rows, gather_token_rows, permute_by_expert, weighted_combine,
)
from molm_ds.ops.grouped_gemm import GroupCounts
from molm_ds.parallel.all_to_all import all_to_all_variable, exchange_counts

__all__ = ["AllToAllDispatcher", "AllToAllPlan", "regroup_order"]


@dataclass
class AllToAllPlan(DispatchPlan):
    order_Ns: Tensor = None  # flat slot index (t * K + s) of each sent row, sorted by global expert
    token_Ns: Tensor = None  # order_Ns // K
    regroup_N: Tensor = None  # received row feeding position i of x_ND (x_ND = x_recv[regroup_N])
    send_splits: list = None  # rows sent to each rank
    recv_splits: list = None  # rows received from each rank


def regroup_order(recv_counts_PE: Tensor, n_rows: int) -> Tensor:
    """Received rows arrive source-major ([q][e] blocks); return the gather index that puts them
    expert-major ([e][q] blocks), each block keeping its row order. ``n_rows`` = recv_counts_PE.sum(),
    passed in from the host so that no sync is needed here."""
    P, El = recv_counts_PE.shape
    sizes_src = recv_counts_PE.reshape(-1)  # blocks in arrival order (q, e)
    start_src_PE = (torch.cumsum(sizes_src, 0) - sizes_src).view(P, El)
    sizes_tgt = recv_counts_PE.t().reshape(-1)  # blocks in target order (e, q)
    start_src_tgt = start_src_PE.t().reshape(-1)
    start_tgt = torch.cumsum(sizes_tgt, 0) - sizes_tgt
    shift = torch.repeat_interleave(start_src_tgt - start_tgt, sizes_tgt, output_size=n_rows)
    return torch.arange(n_rows, device=recv_counts_PE.device) + shift


class AllToAllDispatcher:
    """Dispatch over an expert-parallel process group; idx holds GLOBAL expert ids (-1 = dropped)."""

    def __init__(self, num_experts: int, *, group=None) -> None:
        self.num_experts = num_experts
        self.group = group
        self.ep_size = dist.get_world_size(group)
        self.ep_rank = dist.get_rank(group)
        check_expert_split(num_experts, self.ep_size, what="AllToAllDispatcher")
        self.num_local_experts = num_experts // self.ep_size

    def __repr__(self) -> str:
        return (f"AllToAllDispatcher(num_experts={self.num_experts}, ep_size={self.ep_size}, "
                f"ep_rank={self.ep_rank}, local_experts={self.num_local_experts})")

    def plan(self, idx_TK: Tensor, *, dropless: bool = False) -> AllToAllPlan:
        """``dropless`` changes nothing here: the one host transfer of the split sizes already says how
        many slots were kept."""
        check_dispatch_args(idx_TK, self.num_experts)
        T, K = idx_TK.shape
        P, El = self.ep_size, self.num_local_experts
        order, counts_E = permute_by_expert(idx_TK, self.num_experts)
        send_counts_PE = counts_E.view(P, El)
        recv_counts_PE = exchange_counts(send_counts_PE, self.group)
        # The one host sync per plan: variable-split all-to-all takes its split sizes as Python ints.
        send_host, recv_host = torch.stack([send_counts_PE, recv_counts_PE]).tolist()
        send_splits = [sum(row) for row in send_host]
        recv_splits = [sum(row) for row in recv_host]
        local_counts = [sum(col) for col in zip(*recv_host)]
        order_Ns = order[: sum(send_splits)]
        counts = GroupCounts(recv_counts_PE.sum(0), local_counts)
        return AllToAllPlan(counts, T, K, order_Ns=order_Ns, token_Ns=order_Ns // K,
                            regroup_N=regroup_order(recv_counts_PE, sum(recv_splits)),
                            send_splits=send_splits, recv_splits=recv_splits)

    def dispatch(self, x: Tensor, plan: AllToAllPlan) -> Tensor:
        check_rows(x, plan)
        if x.dim() == 2:
            x_send = gather_token_rows(x, plan.order_Ns, plan.token_Ns, plan.K)
        else:
            x_send = x.reshape(plan.T * plan.K, x.shape[-1]).index_select(0, plan.order_Ns)
        x_recv = all_to_all_variable(x_send, out_splits=plan.recv_splits, in_splits=plan.send_splits, group=self.group)
        return x_recv.index_select(0, plan.regroup_N)

    def _send_back(self, y_ND: Tensor, plan: AllToAllPlan) -> Tensor:
        """Rows computed here -> the rows this rank sent, in its send order."""
        y_recv = y_ND.new_zeros(y_ND.shape).index_copy(0, plan.regroup_N, y_ND)  # undo the regroup
        return all_to_all_variable(y_recv, out_splits=plan.send_splits, in_splits=plan.recv_splits, group=self.group)

    def undispatch(self, y_ND: Tensor, plan: AllToAllPlan) -> Tensor:
        y_send = self._send_back(y_ND, plan)
        out = y_send.new_zeros(plan.T * plan.K, y_send.shape[-1]).index_copy(0, plan.order_Ns, y_send)
        return out.view(plan.T, plan.K, y_send.shape[-1])

    def combine(self, y_ND: Tensor, weights_TK: Tensor, plan: AllToAllPlan) -> Tensor:
        if tuple(weights_TK.shape) != (plan.T, plan.K):
            raise ValueError(f"combine: weights {tuple(weights_TK.shape)} do not match the plan (T={plan.T}, K={plan.K})")
        return weighted_combine(self._send_back(y_ND, plan), weights_TK, plan.order_Ns, plan.token_Ns)
