"""Gradient norm and clipping that count every expert exactly once across expert owners.

After DeepSpeed's reduction, non-expert gradients are identical on every rank, and expert gradients
are identical across an expert-data-parallel group (the replicas of the same experts); the experts of
one expert-parallel group are disjoint and together cover all experts. So
    ||g||^2 = ||g_shared||^2 (local) + sum over the expert-parallel group of ||g_local experts||^2.

DeepSpeed 0.19 gets this right in ZeRO-1/2 and its bf16 optimizer, but in ZeRO-0 fp32
(`runtime/utils.py clip_grad_norm_`) it averages each rank's local norm sqrt(S + X_r) over ranks,
which is not the global norm (tests/parallel compare against a single process), and it never skips a
step with non-finite gradients. `guard_plain_optimizer` makes the client optimizer do both right.
"""

from __future__ import annotations

import types

import torch
from deepspeed.moe.utils import is_moe_param
from torch import Tensor, nn

from molm_ds.parallel import comm

__all__ = ["clip_grad_norm_", "guard_plain_optimizer", "grad_norm", "grad_norm_reference"]


def _ep_group_of(params) -> object:
    from deepspeed.utils import groups

    names = {p.group_name for p in params if is_moe_param(p)}
    if len(names) > 1:
        raise ValueError(f"expert params belong to several expert-parallel groups {sorted(names)}; use one ep_size")
    return groups._get_expert_parallel_group(names.pop()) if names else None


def grad_norm(parameters, *, ep_group=None) -> Tensor:
    """Global L2 norm of the gradients of `parameters` (a module or an iterable), fp32 scalar on the
    parameters' device. Collective over the expert-parallel group whenever expert params exist (call
    on every rank)."""
    params = list(parameters.parameters() if isinstance(parameters, nn.Module) else parameters)
    device = params[0].device if params else torch.device("cpu")
    shared = torch.zeros((), dtype=torch.float32, device=device)
    expert = torch.zeros((), dtype=torch.float32, device=device)
    for p in params:
        if p.grad is None:
            continue
        sq = p.grad.detach().float().pow(2).sum()
        if is_moe_param(p):
            expert = expert + sq
        else:
            shared = shared + sq
    if any(is_moe_param(p) for p in params):
        expert = comm.all_reduce(expert, comm.ReduceOp.SUM, ep_group if ep_group is not None else _ep_group_of(params))
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


def guard_plain_optimizer(engine) -> None:
    """ZeRO-0 fp32 (DeepSpeed steps the client torch optimizer directly): clip with the correct
    expert-aware norm, and skip a step whose gradients are not finite on every rank together, the
    way DeepSpeed's ZeRO-1/2 and bf16 optimizers do. No-op for every other setup.

    The client optimizer's ``step`` computes the global norm (identical on every rank), reads whether it
    is finite (the step's one host sync, as in DeepSpeed's own overflow check), then either clears the
    gradients and sets ``overflow`` (DeepSpeed's engine then counts a skipped step and
    ``engine.was_step_applied()`` is False) or clips and steps. The norm is what
    ``engine.get_global_grad_norm()`` reports."""
    if engine.zero_optimization() or engine.fp16_enabled() or engine.bfloat16_enabled():
        return
    opt, module, max_norm = engine.optimizer, engine.module, engine.gradient_clipping()
    inner_step = opt.step

    def step(closure=None):
        params = [p for g in opt.param_groups for p in g["params"]]
        norm = grad_norm(params)
        opt._global_grad_norm = norm
        opt.overflow = not bool(torch.isfinite(norm))  # host sync: the skip decision
        if opt.overflow:
            for p in module.parameters():
                p.grad = None
            return None
        if max_norm > 0:
            coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            for p in params:
                if p.grad is not None:
                    p.grad.detach().mul_(coef.to(p.grad.device, p.grad.dtype))
        return inner_step(closure)

    opt.step = step
    opt.overflow = False
    engine.clip_fp32_gradients = types.MethodType(lambda self: None, engine)  # clipping is in the step above
