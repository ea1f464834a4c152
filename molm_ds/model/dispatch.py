"""Local (single-process, ep_size = 1) token dispatch: permute rows into expert order and back.

Legend: T tokens, K slots per token, D width, E experts, N kept slots (idx >= 0), grouped by expert.

    x_ND, counts_E, ctx = dispatcher.dispatch(x, idx_TK)   # x: [T, D] (same row for every slot) or [T, K, D]
    y_ND = experts(x_ND, counts_E)
    y_TKD = dispatcher.undispatch(y_ND, ctx)                # zeros where idx_TK == -1
    y_TD = (weights_TK[..., None] * y_TKD).sum(1)            # gates are applied by the layer

Within an expert, rows keep token-major order (token t slot s before token t' > t), so the
expert-parallel dispatcher can reproduce the exact same grouping. `LocalDispatcher` is a plain object
(not an nn.Module): any object with `dispatch` / `undispatch` can replace it on a layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class DispatchContext:
    order_N: Tensor  # flat slot index (t * K + s) of each dispatched row, in expert order
    T: int
    K: int


class LocalDispatcher:
    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts

    def __repr__(self) -> str:
        return f"LocalDispatcher(num_experts={self.num_experts})"

    def dispatch(self, x: Tensor, idx_TK: Tensor):
        T, K = idx_TK.shape
        if x.dim() not in (2, 3) or x.shape[0] != T or (x.dim() == 3 and x.shape[1] != K):
            raise ValueError(f"dispatch: x must be [T, D] or [T, K, D] with T={T}, K={K}; got {tuple(x.shape)}")
        flat = idx_TK.reshape(-1)
        if flat.numel() and int(flat.max()) >= self.num_experts:
            raise ValueError(f"dispatch: expert id {int(flat.max())} >= num_experts={self.num_experts}")
        valid = flat >= 0
        key = torch.where(valid, flat, torch.full_like(flat, self.num_experts))  # dropped slots sort last
        order = torch.argsort(key, stable=True)
        counts_E = torch.bincount(flat[valid], minlength=self.num_experts)
        order_N = order[: int(counts_E.sum())]
        x_ND = x[order_N // K] if x.dim() == 2 else x.reshape(T * K, -1)[order_N]
        return x_ND, counts_E, DispatchContext(order_N, T, K)

    def undispatch(self, y_ND: Tensor, ctx: DispatchContext) -> Tensor:
        out = y_ND.new_zeros(ctx.T * ctx.K, y_ND.shape[-1])
        out = out.index_copy(0, ctx.order_N, y_ND)
        return out.view(ctx.T, ctx.K, -1)
