"""Which parameters a continual-learning job trains, in which optimizer group, at which learning rate.

Groups (each followed by ``_no_decay`` for 1-D tensors): ``new_experts``, ``router``, ``others``.
Whole tensors that do not train get ``requires_grad=False`` and stay out of the optimizer.

Old and new experts share one stacked tensor (first dim = expert), and A' is rows of the router's A;
so a tensor can be partly frozen. Those tensors train under a gradient mask: a hook on the parameter
zeroes the gradient of the frozen rows (``torch.where``, so a NaN-poisoned skip step stays finite
there), and they take no weight decay (AdamW's decoupled decay would move the frozen rows). With zero
gradients from the start Adam's moments stay 0 and its update is exactly 0, so the frozen rows stay bit
for bit. Under expert parallelism the mask is per rank (local expert l is global ``first + l``); a rank
whose local experts are all old keeps the tensor in its optimizer with an all-zero mask, so every rank
has the same group structure (DeepSpeed needs that).

    strategy       new experts   router B, b   router A (old rows)   A'    others
    full_router    train         train         train                 train frozen (train if train_others)
    new_only       train         frozen        frozen                train frozen
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from molm_ds.log import get_logger, info0

__all__ = ["apply_strategy", "continual_param_groups", "trainable_rows", "register_row_mask"]

log = get_logger("continual")


def register_row_mask(p: nn.Parameter, keep_R: Tensor) -> None:
    """Zero the gradient of rows (dim 0) where ``keep_R`` is False, before it is accumulated."""
    keep = keep_R.to(p.device).view(-1, *([1] * (p.dim() - 1)))
    p.continual_row_mask = keep_R.clone()
    p.register_hook(lambda g: torch.where(keep, g, torch.zeros((), dtype=g.dtype, device=g.device)))


def _expert_global_ids(experts: nn.Module) -> Tensor:
    first = int(getattr(experts, "_ds_first_expert", 0))
    return first + torch.arange(int(experts.num_experts))


def trainable_rows(model: nn.Module) -> dict[str, Tensor]:
    """{parameter name: bool rows that train} for the partly frozen tensors (after ``apply_strategy``)."""
    return {n: p.continual_row_mask for n, p in model.named_parameters() if hasattr(p, "continual_row_mask")}


def apply_strategy(model: nn.Module, *, strategy: str, train_others: bool = False) -> dict[str, list]:
    """Freeze / mask a grown model (after ``grow_experts`` and, if any, ``parallelize``). Returns the
    trainable parameters by group: {'new_experts': [...], 'router': [...], 'others': [...]} and the
    partly frozen ones under 'masked'."""
    from molm_ds.model.sublayers import moe_sublayers

    if strategy not in ("full_router", "new_only"):
        raise ValueError(f"unknown continual strategy {strategy!r}: use full_router or new_only")
    if train_others and strategy == "new_only":
        raise ValueError("train_others=True contradicts strategy new_only")
    groups: dict[str, list] = {"new_experts": [], "router": [], "others": [], "masked": []}
    seen: set[int] = set()
    for s in moe_sublayers(model):
        name, layer = s.name, s.module
        if not hasattr(layer, "continual_old_experts"):
            raise ValueError(f"{name}: not grown by molm_ds.continual.grow_experts (no continual_old_experts)")
        E_old, E = int(layer.continual_old_experts), int(layer.num_experts)
        for p in layer.experts.parameters():
            seen.add(id(p))
            if E == E_old:
                p.requires_grad_(False)
                continue
            keep = _expert_global_ids(layer.experts) >= E_old
            register_row_mask(p, keep)
            groups["new_experts"].append(p)
            groups["masked"].append(p)
        router = layer.router
        for pname, p in router.named_parameters():
            seen.add(id(p))
            if strategy == "full_router":
                groups["router"].append(p)
            elif pname == "w_gate" and E > E_old:
                register_row_mask(p, torch.arange(E) >= E_old)
                groups["router"].append(p)
                groups["masked"].append(p)
            else:
                p.requires_grad_(False)
    for p in model.parameters():
        if id(p) in seen:
            continue
        if train_others:
            groups["others"].append(p)
        else:
            p.requires_grad_(False)
    return groups


def continual_param_groups(model: nn.Module, *, strategy: str, train_others: bool, weight_decay: float,
                           lr_new_experts: float, lr_router: float, lr_others: float) -> list[dict]:
    """``apply_strategy`` then param groups (named, each with ``lr`` and ``base_lr``: the trainer's
    schedule scales base_lr), ready for ``molm_ds.parallel.build_param_groups``."""
    g = apply_strategy(model, strategy=strategy, train_others=train_others)
    masked = {id(p) for p in g["masked"]}
    lrs = {"new_experts": lr_new_experts, "router": lr_router, "others": lr_others}
    raw = []
    for kind, lr in lrs.items():
        decay = [p for p in g[kind] if p.ndim >= 2 and id(p) not in masked]
        no_decay = [p for p in g[kind] if p.ndim < 2 or id(p) in masked]
        for suffix, params, wd in (("", decay, weight_decay), ("_no_decay", no_decay, 0.0)):
            if params:
                raw.append({"name": kind + suffix, "params": params, "weight_decay": wd, "lr": lr, "base_lr": lr})
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    info0(f"continual ({strategy}): {n_train:,} of {n_all:,} local parameters in the optimizer "
          f"({len(g['masked'])} tensors row-masked); groups {[r['name'] for r in raw]}")
    return raw
