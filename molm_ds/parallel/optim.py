"""Optimizer parameter groups for DeepSpeed MoE: expert params in `'moe': True` groups.

DeepSpeed's ZeRO-1/2 and bf16 optimizers partition/reduce each `'moe': True` group over the
expert-data-parallel group named by the group's `name` (`ep_size_{N}`), and refuse an MoE model whose
optimizer has no such group. The split is done by DeepSpeed's own
`split_params_into_different_moe_groups_for_optimizer`; this helper only prepares its input (names,
frozen params) and tidies its output (no empty groups, original name kept in `label`).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

from deepspeed.moe.utils import is_moe_param, split_params_into_different_moe_groups_for_optimizer
from torch import nn

__all__ = ["build_param_groups"]


def build_param_groups(
    model_or_groups: Union[nn.Module, Sequence[dict]], *, max_group_size: Optional[int] = None
) -> list[dict]:
    """Param groups for `deepspeed.initialize(model_parameters=...)` or a torch optimizer.

    `model_or_groups`: a module (one group of all its trainable parameters, name "params") or a list
    of param-group dicts (`params` required; `name` defaults to `group{i}`; other keys such as `lr`,
    `weight_decay` are kept and copied onto the expert part of the group). Frozen parameters
    (requires_grad False) are dropped. A parameter in two groups is an error. Each returned group
    keeps the caller's group name in `label` (DeepSpeed renames expert groups to `ep_size_{N}`);
    expert groups have `'moe': True`. `max_group_size` (elements) splits large expert groups
    (DeepSpeed's option; None = no split)."""
    if isinstance(model_or_groups, nn.Module):
        raw = [{"name": "params", "params": list(model_or_groups.parameters())}]
    else:
        raw = list(model_or_groups)
        if not raw or not all(isinstance(g, dict) and "params" in g for g in raw):
            raise ValueError("build_param_groups: pass a module or a non-empty list of dicts, each with a 'params' key")
    seen: set[int] = set()
    groups = []
    for i, g in enumerate(raw):
        params = [p for p in g["params"] if p.requires_grad]
        for p in params:
            if id(p) in seen:
                raise ValueError(f"build_param_groups: a parameter appears in more than one group (group {g.get('name', i)!r})")
            seen.add(id(p))
        name = g.get("name", f"group{i}")
        groups.append({**g, "name": name, "label": name, "params": params})
    names = [g["name"] for g in groups]
    if len(set(names)) != len(names):
        raise ValueError(f"build_param_groups: group names must be unique (DeepSpeed keys its split by name): {names}")
    split = split_params_into_different_moe_groups_for_optimizer(groups, max_group_size=max_group_size)
    out = [g for g in split if g["params"]]
    if not out:
        raise ValueError("build_param_groups: no trainable parameters")
    for g in out:
        if g.get("moe"):
            assert all(is_moe_param(p) for p in g["params"])
    return out
