"""Auxiliary router losses: pure, keyword-only functions (each tested alone on hand-computed cases).

Legend: T tokens, E experts, K experts per token, N new router rows, R router width.
`mask_T` (bool, True = real token) excludes padding from every statistic.

Where p(m) is pooled: by default `mi_loss` and `load_concentration_loss` pool
`p(m) = mean_x p(m|x)` over the tokens they are given, i.e. over one MoE sub-layer's tokens of the
current micro-batch (the model calls them once per sub-layer per forward). To pool wider (a
gradient-accumulation window, or all-reduced over data-parallel ranks) pass the pooled `p_E`
yourself; H(m|x) is always the mean over the given tokens.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

_EPS = 1e-12


def _masked_mean(v_T: Tensor, mask_T: Optional[Tensor]) -> Tensor:
    if mask_T is None:
        return v_T.mean(0)
    m = mask_T.to(v_T.dtype)
    while m.dim() < v_T.dim():
        m = m.unsqueeze(-1)
    return (v_T * m).sum(0) / m.sum().clamp_min(1.0)


def _entropy(p: Tensor) -> Tensor:
    """-sum p log p over the last dim (0 log 0 = 0)."""
    return -(p * p.clamp_min(_EPS).log()).sum(-1)


def pooled_p(*, probs_TE: Tensor, mask_T: Optional[Tensor] = None) -> Tensor:
    """p(m) = mean over the (real) tokens of p(m|x)."""
    return _masked_mean(probs_TE.float(), mask_T)


def mi_loss(*, probs_TE: Tensor, mask_T: Optional[Tensor] = None, p_E: Optional[Tensor] = None) -> Tensor:
    """MoLM mutual-information load balance L = H(m|x) - H(m) = -MI(m; x), on the full softmax.
    Minimum -log E (confident and balanced); 0 for uniform p(m|x). p(m) is pooled over the given tokens
    unless `p_E` is passed."""
    h_cond = _masked_mean(_entropy(probs_TE.float()), mask_T)
    p = pooled_p(probs_TE=probs_TE, mask_T=mask_T) if p_E is None else p_E.float()
    return h_cond - _entropy(p)


def load_concentration_loss(*, probs_TE: Tensor, mask_T: Optional[Tensor] = None, p_E: Optional[Tensor] = None) -> Tensor:
    """Load concentration for fine-tuning: H(m), with p(m) pooled as in `mi_loss`. Minimum 0 (one expert)."""
    p = pooled_p(probs_TE=probs_TE, mask_T=mask_T) if p_E is None else p_E.float()
    return _entropy(p)


def switch_loss(*, probs_TE: Tensor, idx_TK: Tensor, mask_T: Optional[Tensor] = None) -> Tensor:
    """Switch Transformer balance loss E * sum_e f_e P_e: f_e = share of the routed slots (idx >= 0) sent
    to expert e, P_e = mean router probability of e. 1 when perfectly balanced."""
    E = probs_TE.shape[-1]
    valid = idx_TK >= 0
    if mask_T is not None:
        valid = valid & mask_T[:, None]
    # every slot adds its weight (1 if routed and real, else 0) to its expert: no boolean-mask indexing,
    # whose output size depends on the values (a host sync on a GPU); sums of 0s and 1s are exact
    counts_E = torch.zeros(E, device=probs_TE.device, dtype=torch.float32)
    counts_E = counts_E.index_add(0, idx_TK.clamp_min(0).reshape(-1), valid.reshape(-1).to(torch.float32))
    f_E = counts_E / counts_E.sum().clamp_min(1.0)
    P_E = pooled_p(probs_TE=probs_TE, mask_T=mask_T)
    return E * (f_E * P_E).sum()


def z_loss(*, logits_TE: Tensor, mask_T: Optional[Tensor] = None) -> Tensor:
    """Router z-loss (ST-MoE): mean over tokens of logsumexp(logits)^2."""
    return _masked_mean(torch.logsumexp(logits_TE.float(), dim=-1) ** 2, mask_T)


def router_norm_penalty(*, new_rows_NR: Tensor) -> Tensor:
    """Continual-learning regulariser on the new module embeddings A' (new rows of `router.w_gate`):
    ||A'||_F^2. Multiply by the job's weight lambda."""
    return new_rows_NR.float().pow(2).sum()
