"""Make a stacked-weight experts module look like a DeepSpeed MoE layer to DeepSpeed's engine.

DeepSpeed 0.19 decides MoE-ness and checkpoint naming like this (runtime/engine.py):
- the engine counts the model as MoE only if some module `isinstance(m, deepspeed.moe.layer.MoE)`;
  then expert params (`allreduce=False`, `group_name="ep_size_{N}"`) are reduced over the
  expert-data-parallel group and everything else over the data-parallel group;
- `_save_moe_checkpoint` walks `named_modules()`; the L-th MoE module (counting from 0) writes, for
  every key of `module.state_dict()` that contains "expert", one file per GLOBAL expert
  `layer_{L}_expert_{ep_rank * num_local_experts + local}_mp_rank_00_model_states.pt`, finding the local
  id with the pattern `.deepspeed_moe.experts.deepspeed_experts.{local}.`; the main model file gets
  the rest (`_get_non_moe_state_dict` drops every key under the module that contains "expert");
- `load_moe_state_dict` reads this rank's global experts back under local ids and the engine calls
  `model.load_state_dict` on the union.

The bridge: `to_deepspeed_moe(experts, ...)` re-classes the experts module in place (like FSDP2's
`fully_shard`) to `DeepSpeedMoE<Class>(Class, DeepSpeedMoEMixin)`: its own forward and parameter
names are unchanged, `isinstance(m, MoE)` is true, and state-dict hooks present every stacked weight
`w [E_l, ...]` as per-expert slices `deepspeed_moe.experts.deepspeed_experts.{local}.w` (and stack them
back on load; a full stacked `w [E, ...]` also loads, taking this rank's slice).
"""

from __future__ import annotations

import re

import torch
from deepspeed.moe.layer import MoE
from torch import Tensor, nn

from molm_ds.checkpoint.layout import EXPERT_INFIX as EXPERT_KEY
from molm_ds.config import check_expert_split

__all__ = ["DeepSpeedMoEMixin", "to_deepspeed_moe", "is_deepspeed_moe_bridge"]


class DeepSpeedMoEMixin(MoE):
    """Mixin placed AFTER the experts class in the MRO, so the experts' forward wins. Holds what
    DeepSpeed's engine reads from an MoE module: `expert_group_name`, `num_local_experts`, `ep_size`,
    `set_deepspeed_parallelism`. (`MoE.__init__` is never called: it would build DeepSpeed's gate.)"""

    _ds_stacked: tuple  # names of the stacked expert parameters

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        # Groups were created by `parallelize` with DeepSpeed's own helper; only make sure they exist.
        from deepspeed.utils import groups

        if self.expert_group_name not in groups._get_expert_parallel_group_dict():
            groups._create_expert_and_data_parallel(
                self.ep_size, use_data_before_expert_parallel_=use_data_before_expert_parallel_)


_CLASS_CACHE: dict[type, type] = {}


def _bridge_class(cls: type) -> type:
    if cls not in _CLASS_CACHE:
        _CLASS_CACHE[cls] = type(f"DeepSpeedMoE{cls.__name__}", (cls, DeepSpeedMoEMixin), {"__module__": __name__})
    return _CLASS_CACHE[cls]


def is_deepspeed_moe_bridge(m: nn.Module) -> bool:
    return isinstance(m, DeepSpeedMoEMixin)


def _state_dict_hook(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    for name in module._ds_stacked:
        w = state_dict.pop(prefix + name)
        for i in range(w.shape[0]):
            state_dict[f"{prefix}{EXPERT_KEY}.{i}.{name}"] = w[i]


def _load_pre_hook(module: nn.Module, state_dict: dict, prefix: str, local_metadata, strict, missing_keys,
                   unexpected_keys, error_msgs) -> None:
    El, E, first = module.num_local_experts, module._ds_num_experts, module._ds_first_expert
    for name in module._ds_stacked:
        keys = [f"{prefix}{EXPERT_KEY}.{i}.{name}" for i in range(El)]
        present = [k in state_dict for k in keys]
        if all(present):
            state_dict[prefix + name] = torch.stack([state_dict.pop(k) for k in keys])
        elif any(present):
            error_msgs.append(f"{prefix}{name}: per-expert keys missing for local experts "
                              f"{[i for i, p in enumerate(present) if not p]} (have {sum(present)} of {El})")
        elif prefix + name in state_dict:
            w: Tensor = state_dict[prefix + name]
            if w.shape[0] == E and E != El:  # a full (single-process) stacked weight: take our slice
                state_dict[prefix + name] = w[first:first + El]
    # Per-expert keys beyond this rank's local experts are someone else's: leave them to strict checks.
    pat = re.compile(re.escape(prefix + EXPERT_KEY) + r"\.(\d+)\.")
    for k in list(state_dict):
        m = pat.match(k)
        if m and int(m.group(1)) >= El:
            error_msgs.append(f"{k}: local expert id {m.group(1)} >= num_local_experts={El}")


def to_deepspeed_moe(experts: nn.Module, *, num_experts: int, ep_size: int, ep_rank: int, group_name: str) -> nn.Module:
    """Slice `experts`' stacked weights (first dim = global expert) to this rank's experts, mark them
    as DeepSpeed expert params and re-class the module as a DeepSpeed MoE (in place; returned)."""
    if is_deepspeed_moe_bridge(experts):
        raise ValueError(f"{type(experts).__name__} is already expert-parallel; call parallelize once per model")
    check_expert_split(num_experts, ep_size, what=type(experts).__name__)
    El = num_experts // ep_size
    first = ep_rank * El
    stacked = []
    for name, p in list(experts.named_parameters(recurse=False)):
        if p.dim() == 0 or p.shape[0] != num_experts:
            raise ValueError(f"{type(experts).__name__}.{name} has shape {tuple(p.shape)}; expert weights must be "
                             f"stacked with the expert first ([{num_experts}, ...])")
        local = nn.Parameter(p.detach()[first:first + El].clone(), requires_grad=p.requires_grad)
        local.allreduce = False
        local.group_name = group_name
        local._molm_first_expert = first  # global id of local expert 0 (topology-free optimizer state)
        setattr(experts, name, local)
        stacked.append(name)
    if not stacked or any(True for _ in experts.children()) or any(True for _ in experts.buffers()):
        raise ValueError(f"{type(experts).__name__}: expected stacked expert parameters only (no children, no buffers)")
    experts.__class__ = _bridge_class(type(experts))
    experts.ep_size = ep_size
    experts.expert_group_name = group_name
    experts.num_local_experts = El
    experts.enable_expert_tensor_parallelism = False
    experts.use_residual = False
    experts._ds_num_experts = num_experts
    experts._ds_first_expert = first
    experts._ds_stacked = tuple(stacked)
    experts.register_state_dict_post_hook(_state_dict_hook)
    experts.register_load_state_dict_pre_hook(_load_pre_hook)
    return experts
