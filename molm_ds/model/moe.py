"""MoE MLP sub-layer and the routing bookkeeping shared with the attention sub-layer.

Legend: B batch, T tokens (B*T flattened inside the layer), D d_model, E experts, K experts per token.
Stages: route -> plan (sort slots by expert) -> dispatch -> experts -> combine (unpermute + gates); when
the plan keeps the rows in this process (``plan.token_slots``), dispatch and combine are fused into the
expert GEMMs (``MLPExperts.forward_tokens``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from molm_ds import losses
from molm_ds.config import ModelConfig
from molm_ds.model.dispatch import LocalDispatcher
from molm_ds.model.experts import MLPExperts
from molm_ds.model.router import Router, RouterOutput
from molm_ds.ops.backend import use_triton

AUX_KEYS = ("mi", "load_concentration", "switch", "z")


@dataclass
class RoutingRecord:
    """What a sub-layer's last forward routed (detached): for monitoring, pruning and aux statistics."""

    probs_TE: Tensor
    idx_TK: Tensor
    mask_T: Optional[Tensor]  # True = real token; None = all real


def make_router(config: ModelConfig, num_experts: int, top_k: int) -> Router:
    return Router(
        config.d_model, num_experts, top_k,
        router_type=config.router_type, gating_size=config.gating_size,
        renormalize_topk=config.renormalize_topk, sample_topk=config.sample_topk,
        routing=config.routing, capacity_factor=config.capacity_factor,
        balance=config.router_balance, bias_rate=config.router_bias_rate,
    )


def aux_terms(r: RouterOutput, mask_T: Optional[Tensor]) -> dict[str, Tensor]:
    """The four aux terms of one sub-layer (p(m) pooled over this micro-batch's real tokens)."""
    return {
        "mi": losses.mi_loss(probs_TE=r.probs_TE, mask_T=mask_T),
        "load_concentration": losses.load_concentration_loss(probs_TE=r.probs_TE, mask_T=mask_T),
        "switch": losses.switch_loss(probs_TE=r.probs_TE, idx_TK=r.idx_TK, mask_T=mask_T),
        "z": losses.z_loss(logits_TE=r.logits_TE, mask_T=mask_T),
    }


class MoEMLP(nn.Module):
    """Mixture of MLP experts: y = sum_{m in topk(x)} g_m(x) f_m(x)."""

    def __init__(self, config: ModelConfig, layer: int = 0) -> None:
        super().__init__()
        E = config.mlp_experts_at(layer)  # differs per layer only in pruned models
        self.num_experts = E
        self.router = make_router(config, E, config.k_mlp_at(layer))
        self.experts = MLPExperts(E, config.d_model, config.ffd_hidden, config.mlp_activation)
        self.dispatcher = LocalDispatcher(E)
        self.last_routing: Optional[RoutingRecord] = None

    def forward(self, x_BTD: Tensor, mask_BT: Optional[Tensor] = None) -> tuple[Tensor, dict[str, Tensor]]:
        B, T, D = x_BTD.shape
        x_TD = x_BTD.reshape(B * T, D)
        mask_T = None if mask_BT is None else mask_BT.reshape(B * T).bool()
        r = self.router(x_TD, mask_T)
        plan = self.dispatcher.plan(r.idx_TK, dropless=not self.router.may_drop(mask_T))
        # the rows stay here: gather and combine fuse into the GEMMs -- but in deterministic mode only on
        # Triton (atomic-free kernels): the PyTorch fused path scatters with index_add_ (molm_ds.model.dispatch)
        fuse = not torch.are_deterministic_algorithms_enabled() or use_triton(x_TD)
        if plan.token_slots is not None and fuse:
            y_TD = self.experts.forward_tokens(x_TD, r.weights_TK, plan.token_slots, plan.counts)
        else:
            y_ND = self.experts(self.dispatcher.dispatch(x_TD, plan), plan.counts)
            y_TD = self.dispatcher.combine(y_ND, r.weights_TK, plan)
        self.last_routing = RoutingRecord(r.probs_TE.detach(), r.idx_TK.detach(), mask_T)
        return y_TD.view(B, T, D), aux_terms(r, mask_T)
