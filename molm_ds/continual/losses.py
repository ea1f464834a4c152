"""Continual-learning loss terms: pure keyword-only functions plus the model-level sum of the A' penalty.

Legend: B batch, T tokens, V vocab, N new router rows, R router width.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from molm_ds.losses import router_norm_penalty

__all__ = ["distillation_kl", "distillation_kl_reference", "new_router_rows_penalty"]


def distillation_kl(*, student_logits_BTV: Tensor, teacher_logits_BTV: Tensor, temperature: float = 1.0,
                    mask_BT: Optional[Tensor] = None) -> Tensor:
    """Lifelong-MoE distillation: mean over (real) tokens of KL(p_teacher || p_student) with both softmaxes
    at ``temperature``, times temperature^2 (so gradients keep their scale). Teacher gets no gradient."""
    t = float(temperature)
    log_q = F.log_softmax(student_logits_BTV.float() / t, dim=-1)
    log_p = F.log_softmax(teacher_logits_BTV.detach().float() / t, dim=-1)
    kl_BT = (log_p.exp() * (log_p - log_q)).sum(-1)
    if mask_BT is None:
        return kl_BT.mean() * t * t
    m = mask_BT.to(kl_BT.dtype)
    return (kl_BT * m).sum() / m.sum().clamp_min(1.0) * t * t


def distillation_kl_reference(*, student_logits_BTV: Tensor, teacher_logits_BTV: Tensor, temperature: float = 1.0,
                              mask_BT: Optional[Tensor] = None) -> Tensor:
    """Token-by-token loop of the same quantity (slow path for tests)."""
    B, T, V = student_logits_BTV.shape
    total, count = student_logits_BTV.new_zeros((), dtype=torch.float64), 0
    for b in range(B):
        for i in range(T):
            if mask_BT is not None and not bool(mask_BT[b, i]):
                continue
            p = torch.softmax(teacher_logits_BTV[b, i].double() / temperature, -1)
            q = torch.softmax(student_logits_BTV[b, i].double() / temperature, -1)
            total = total + sum(p[v] * (torch.log(p[v]) - torch.log(q[v])) for v in range(V))
            count += 1
    return (total / max(count, 1) * temperature ** 2).float()


def new_router_rows_penalty(model: nn.Module) -> Tensor:
    """sum over grown MoE sub-layers of ||A'||_F^2, A' = router.w_gate[E_old:] (the new module embeddings)."""
    terms = []
    for m in model.modules():
        E_old = getattr(m, "continual_old_experts", None)
        if E_old is not None and int(m.num_experts) > E_old:
            terms.append(router_norm_penalty(new_rows_NR=m.router.w_gate[E_old:]))
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).sum()
