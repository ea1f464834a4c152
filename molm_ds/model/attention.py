"""Mixture of stick-breaking attention experts (MoA) with shared keys/values.

Legend: B batch, T new tokens, S = past + T keys, D d_model, A att_hidden, h heads per expert
(n_head), d = A / h head dim, K experts per token, E experts, N dispatched rows.

Each (token, chosen expert) pair is a query: q = x W_q^m, split into h heads. Keys and values are
shared by all experts: K = V = LN1(x) in MoLM (no weights), or shared projections (`kv_proj`, with
bias as in the released code). The K*h query heads of a token read the h shared key heads: query
head (head j, slot s) is stored at index j*K + s so that `stickbreaking_attention` (query head i reads
key head i // K) pairs it with key head j. Each slot's attention output goes through its expert's
W_o and the slots are summed with the gates.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from molm_ds.config import ModelConfig
from molm_ds.model.dispatch import LocalDispatcher
from molm_ds.model.experts import AttentionExperts
from molm_ds.model.moe import RoutingRecord, aux_terms, make_router
from molm_ds.ops import stickbreaking_attention

KVCache = tuple[Tensor, Tensor]  # (k_BSX, v_BSX), X = D (shared, no projection) or A


class MixtureOfAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int = 0) -> None:
        super().__init__()
        E = config.att_experts_at(layer)  # differs per layer only in pruned models
        self.num_experts = E
        self.n_head = config.n_head
        self.head_dim = config.head_dim
        self.include_current = config.stickbreaking_include_current
        self.router = make_router(config, E, config.k_att_at(layer))
        self.experts = AttentionExperts(E, config.d_model, config.att_hidden)
        self.dispatcher = LocalDispatcher(E)
        if config.kv_proj:
            self.k_proj = nn.Linear(config.d_model, config.att_hidden)
            self.v_proj = nn.Linear(config.d_model, config.att_hidden)
        else:
            self.k_proj = self.v_proj = None
        self.last_routing: Optional[RoutingRecord] = None

    def shared_kv(self, x_BTD: Tensor) -> KVCache:
        if self.k_proj is None:
            return x_BTD, x_BTD
        return self.k_proj(x_BTD), self.v_proj(x_BTD)

    def forward(
        self,
        x_BTD: Tensor,
        mask_BT: Optional[Tensor] = None,
        key_mask_BS: Optional[Tensor] = None,
        past: Optional[KVCache] = None,
    ) -> tuple[Tensor, dict[str, Tensor], KVCache]:
        """x is LN1(h). mask_BT: real new tokens; key_mask_BS: real keys (past + new). Returns
        (y_BTD, aux terms, (k, v) over all S keys for the cache)."""
        B, T, D = x_BTD.shape
        k_BTX, v_BTX = self.shared_kv(x_BTD)
        if past is not None:
            k_BTX = torch.cat([past[0].to(k_BTX.dtype), k_BTX], dim=1)
            v_BTX = k_BTX if self.k_proj is None else torch.cat([past[1].to(v_BTX.dtype), v_BTX], dim=1)
        S = k_BTX.shape[1]
        h, d = self.n_head, self.head_dim

        x_TD = x_BTD.reshape(B * T, D)
        mask_T = None if mask_BT is None else mask_BT.reshape(B * T).bool()
        r = self.router(x_TD, mask_T)
        K = r.idx_TK.shape[1]

        # one routing plan for both expert projections: permute -> query projections -> unpermute
        plan = self.dispatcher.plan(r.idx_TK, dropless=not self.router.may_drop(mask_T))
        q_TKA = self.dispatcher.undispatch(self.experts.forward_q(self.dispatcher.dispatch(x_TD, plan), plan.counts), plan)

        # stick-breaking attention: query heads [B, h*K, T, d] over shared key heads [B, h, S, d]
        q = q_TKA.view(B, T, K, h, d).permute(0, 3, 2, 1, 4).reshape(B, h * K, T, d)
        k = k_BTX.view(B, S, h, d).transpose(1, 2)
        v = v_BTX.view(B, S, h, d).transpose(1, 2)
        o = stickbreaking_attention(
            q, k, v, include_current=self.include_current,
            key_padding_mask=None if key_mask_BS is None else key_mask_BS.bool(),
        )
        o_TKA = o.view(B, h, K, T, d).permute(0, 3, 2, 1, 4).reshape(B * T, K, h * d)

        # permute -> output projections -> unpermute + gate-weighted sum (fused)
        y_ND = self.experts.forward_o(self.dispatcher.dispatch(o_TKA, plan), plan.counts)
        y_TD = self.dispatcher.combine(y_ND, r.weights_TK, plan)
        self.last_routing = RoutingRecord(r.probs_TE.detach(), r.idx_TK.detach(), mask_T)
        return y_TD.view(B, T, D), aux_terms(r, mask_T), (k_BTX, v_BTX)

