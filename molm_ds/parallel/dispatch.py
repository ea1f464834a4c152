"""Expert-parallel token dispatch: the all-to-all twin of `molm_ds.model.LocalDispatcher`.

Legend: T tokens, K slots per token, D width, E global experts, P = ep_size ranks, E_l = E / P local
experts (rank p owns global ids p*E_l .. (p+1)*E_l - 1), N_s rows this rank sends, N rows it receives.

Stages (each a small function, the same sequence of collectives on every rank whatever the routing):
    route (done by the router: idx_TK holds global ids, -1 = dropped slot)
    -> permute: sort this rank's slots by global expert (stable, token-major), drop -1 slots
    -> exchange counts (all_to_all_single of [P, E_l] int64 counts)
    -> all-to-all of the rows (variable splits, differentiable)
    -> regroup the received rows by local expert (then source rank, then token)
    == experts compute on x_ND with counts_El ==
    -> undo the regroup -> reverse all-to-all -> unpermute into y_TKD (zeros for dropped slots)
The layer then applies the gates: y_TD = sum_k weights_TK[..., None] * y_TKD.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from molm_ds.model.dispatch import check_dispatch_args, permute_by_expert
from molm_ds.parallel.all_to_all import all_to_all_variable, exchange_counts

__all__ = ["AllToAllDispatcher", "AllToAllContext", "permute_by_expert", "regroup_order"]


@dataclass
class AllToAllContext:
    order_Ns: Tensor  # flat slot index (t * K + s) of each sent row, sorted by global expert
    regroup_N: Tensor  # received row feeding position i of x_ND (x_ND = x_recv[regroup_N])
    send_splits: list  # rows sent to each rank
    recv_splits: list  # rows received from each rank
    T: int
    K: int


def regroup_order(recv_counts_PE: Tensor) -> Tensor:
    """Received rows arrive source-major ([q][e] blocks); return the gather index that puts them
    expert-major ([e][q] blocks), each block keeping its row order."""
    P, El = recv_counts_PE.shape
    sizes_src = recv_counts_PE.reshape(-1)  # blocks in arrival order (q, e)
    start_src_PE = (torch.cumsum(sizes_src, 0) - sizes_src).view(P, El)
    sizes_tgt = recv_counts_PE.t().reshape(-1)  # blocks in target order (e, q)
    start_src_tgt = start_src_PE.t().reshape(-1)
    start_tgt = torch.cumsum(sizes_tgt, 0) - sizes_tgt
    N = int(sizes_src.sum())
    shift = torch.repeat_interleave(start_src_tgt - start_tgt, sizes_tgt, output_size=N)
    return torch.arange(N, device=recv_counts_PE.device) + shift


class AllToAllDispatcher:
    """Dispatch over an expert-parallel process group. Same interface as `LocalDispatcher`:
    `dispatch(x, idx_TK) -> (x_ND, counts_El, ctx)`, `undispatch(y_ND, ctx) -> y_TKD`."""

    def __init__(self, num_experts: int, *, group=None) -> None:
        self.num_experts = num_experts
        self.group = group
        self.ep_size = dist.get_world_size(group)
        self.ep_rank = dist.get_rank(group)
        if num_experts % self.ep_size:
            raise ValueError(
                f"AllToAllDispatcher: num_experts={num_experts} is not divisible by ep_size={self.ep_size}; "
                "choose an ep_size that divides the expert count"
            )
        self.num_local_experts = num_experts // self.ep_size

    def __repr__(self) -> str:
        return (f"AllToAllDispatcher(num_experts={self.num_experts}, ep_size={self.ep_size}, "
                f"ep_rank={self.ep_rank}, local_experts={self.num_local_experts})")

    def dispatch(self, x: Tensor, idx_TK: Tensor):
        T, K = idx_TK.shape
        check_dispatch_args(x, idx_TK, self.num_experts)
        P, El = self.ep_size, self.num_local_experts
        order_Ns, counts_E = permute_by_expert(idx_TK, self.num_experts)
        x_send = x[order_Ns // K] if x.dim() == 2 else x.reshape(T * K, x.shape[-1])[order_Ns]
        send_counts_PE = counts_E.view(P, El)
        recv_counts_PE = exchange_counts(send_counts_PE, self.group)
        send_splits = send_counts_PE.sum(1).tolist()
        recv_splits = recv_counts_PE.sum(1).tolist()
        x_recv = all_to_all_variable(x_send, out_splits=recv_splits, in_splits=send_splits, group=self.group)
        regroup_N = regroup_order(recv_counts_PE)
        x_ND = x_recv[regroup_N]
        counts_El = recv_counts_PE.sum(0)
        return x_ND, counts_El, AllToAllContext(order_Ns, regroup_N, send_splits, recv_splits, T, K)

    def undispatch(self, y_ND: Tensor, ctx: AllToAllContext) -> Tensor:
        y_recv = y_ND.new_zeros(y_ND.shape).index_copy(0, ctx.regroup_N, y_ND)  # undo the regroup
        y_send = all_to_all_variable(y_recv, out_splits=ctx.send_splits, in_splits=ctx.recv_splits, group=self.group)
        out = y_send.new_zeros(ctx.T * ctx.K, y_send.shape[-1]).index_copy(0, ctx.order_Ns, y_send)
        return out.view(ctx.T, ctx.K, y_send.shape[-1])
