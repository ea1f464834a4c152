"""Gradient norm and clipping that count every expert exactly once across expert owners.

After DeepSpeed's reduction, non-expert gradients are identical on every rank, and expert gradients
are identical across an expert-data-parallel group (the replicas of the same experts); the experts of
one expert-parallel group are disjoint and together cover all experts. So
    ||g||^2 = ||g_shared||^2 (local) + sum over the expert-parallel group of ||g_local experts||^2.

DeepSpeed 0.19 gets this right in ZeRO-1/2 and its bf16 optimizer, but in ZeRO-0 fp32
(`runtime/utils.py clip_grad_norm_`) it averages each rank's local norm sqrt(S + X_r) over ranks,
which is not the global norm (tests/parallel compare against a single process). `fix_grad_clipping`
replaces that one engine method on the instance.
"""

from __future__ import annotations

import types

import torch
import torch.distributed as dist
from deepspeed.moe.utils import is_moe_param
from torch import Tensor, nn

__all__ = ["clip_grad_norm_", "fix_grad_clipping", "grad_norm", "grad_norm_reference"]


def _ep_group_of(params) -> object:
    from deepspeed.utils import groups

    names = {p.group_name for p in params if is_moe_param(p)}
    if len(names) > 1:
        raise ValueError(f"expert params belong to several expert-parallel groups {sorted(names)}; use one ep_size")
    return groups._get_expert_parallel_group(names.pop()) if names else None


def grad_norm(parameters, *, ep_group=None) -> Tensor:
    """Global L2 norm of the gradients of `parameters` (a module or an iterable), fp32 scalar.
    Collective over the expert-parallel group whenever expert params exist (call on every rank)."""
    params = list(parameters.parameters() if isinstance(parameters, nn.Module) else parameters)
    shared = torch.zeros((), dtype=torch.float32)
    expert = torch.zeros((), dtype=torch.float32)
    for p in params:
        if p.grad is None:
            continue
        sq = p.grad.detach().float().pow(2).sum()
        if is_moe_param(p):
            expert = expert + sq
        else:
            shared = shared + sq
    has_experts = any(is_moe_param(p) for p in params)
    if has_experts and dist.is_initialized():
        group = ep_group if ep_group is not None else _ep_group_of(params)
        dist.all_reduce(expert, op=dist.ReduceOp.SUM, group=group)
    return (shared + expert).sqrt()


def grad_norm_reference(model: nn.Module) -> Tensor:
    """Single-process norm (the slow path): torch's own clip-free norm over every gradient."""
    grads = [p.grad.detach().float() for p in model.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


def clip_grad_norm_(parameters, max_norm: float, *, ep_group=None) -> Tensor:
    """Scale gradients in place so the global norm is at most max_norm; return the norm before clipping."""
    params = list(parameters.parameters() if isinstance(parameters, nn.Module) else parameters)
    total = grad_norm(params, ep_group=ep_group)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for p in params:
        if p.grad is not None:
            p.grad.detach().mul_(coef.to(p.grad.device, p.grad.dtype))
    return total


def fix_grad_clipping(engine) -> None:
    """Make a DeepSpeed engine clip with the correct expert-aware norm where it does not (ZeRO-0 fp32);
    the norm is also recorded as `engine.get_global_grad_norm()`. No-op for other setups."""
    if engine.zero_optimization() or engine.fp16_enabled() or engine.bfloat16_enabled():
        return

    def clip_fp32_gradients(self):
        self._global_grad_norm = clip_grad_norm_(self.module, self.gradient_clipping())

    engine.clip_fp32_gradients = types.MethodType(clip_fp32_gradients, engine)
