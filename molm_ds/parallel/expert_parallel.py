"""`parallelize(model, ep_size, ...)`: expert parallelism for a plain-PyTorch MoLM on DeepSpeed's groups.

The model stays plain PyTorch (torchtitan's model.py / parallelize.py split): this module finds the
MoE sub-layers (modules with `router`, `experts`, `dispatcher`, `num_experts`), slices their stacked
expert weights to this rank's experts, swaps the dispatcher and bridges the experts to DeepSpeed
(`bridge.py`). Call it on every rank, after `deepspeed.init_distributed()` and before
`deepspeed.initialize`, on a model initialised identically on every rank (same seed).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.distributed as dist
from torch import nn

from molm_ds.log import get_logger, info0
from molm_ds.model.sublayers import MLP, moe_sublayers
from molm_ds.parallel.bridge import to_deepspeed_moe
from molm_ds.parallel.dispatch import AllToAllDispatcher
from molm_ds.parallel.groups import check_expert_parallel, expert_parallel_groups, group_name

__all__ = ["ExpertParallelInfo", "MoELayerInfo", "parallelize"]

log = get_logger("parallel")


@dataclass(frozen=True)
class MoELayerInfo:
    name: str  # module name of the MoE sub-layer in the model
    kind: str  # "attn" or "mlp" (molm_ds.model.sublayers)
    num_experts: int  # global
    num_local_experts: int
    first_expert: int  # global id of local expert 0
    ckpt_layer_id: int  # DeepSpeed's layer_{L} in expert checkpoint file names


@dataclass
class ExpertParallelInfo:
    ep_size: int
    ep_rank: int
    world_size: int
    group_name: str
    ep_group: object = field(repr=False)
    edp_group: object = field(repr=False)
    layers: list = field(default_factory=list)  # [MoELayerInfo], expert-parallel sub-layers only
    replicated: list = field(default_factory=list)  # names of MoE sub-layers whose experts stay replicated


def parallelize(model: nn.Module, ep_size: int, *, replicate_attention_experts: bool) -> ExpertParallelInfo:
    """Make `model` expert-parallel over DeepSpeed's `ep_size_{ep_size}` groups (in place).

    MLP experts are always expert-parallel; attention experts too unless `replicate_attention_experts`.
    Every expert-parallel `experts` module becomes a `deepspeed.moe.layer.MoE` holding this rank's
    E / ep_size experts (global id = ep_rank * E_l + local id); with ep_size > 1 its dispatcher becomes
    an `AllToAllDispatcher` over the expert-parallel group. Also at ep_size 1 the experts are bridged,
    so the DeepSpeed engine and checkpoints are the same at every ep_size."""
    sublayers = [(s.name, s.module, s.kind) for s in moe_sublayers(model)]
    if not sublayers:
        raise ValueError(f"parallelize: {type(model).__name__} publishes no MoE sub-layers (moe_sublayers())")
    chosen = [(n, m, k) for n, m, k in sublayers if k == MLP or not replicate_attention_experts]
    ep_group, edp_group = expert_parallel_groups(ep_size)  # also checks ep_size | world size
    world = dist.get_world_size()
    check_expert_parallel(ep_size=ep_size, world_size=world,
                          expert_counts={f"{n or 'model'} ({k} experts)": m.num_experts for n, m, k in chosen})
    ep_rank = dist.get_rank(ep_group)
    name = group_name(ep_size)
    info = ExpertParallelInfo(ep_size, ep_rank, world, name, ep_group, edp_group)
    for layer_id, (n, m, kind) in enumerate(chosen):
        E = int(m.num_experts)
        if getattr(m.experts, "num_experts", E) != E:
            raise ValueError(f"{n}: experts hold {m.experts.num_experts} experts but the layer routes over {E}")
        to_deepspeed_moe(m.experts, num_experts=E, ep_size=ep_size, ep_rank=ep_rank, group_name=name)
        if ep_size > 1:
            m.dispatcher = AllToAllDispatcher(E, group=ep_group)
        info.layers.append(MoELayerInfo(n, kind, E, E // ep_size, ep_rank * (E // ep_size), layer_id))
    chosen_names = {n for n, _, _ in chosen}
    info.replicated = [n for n, _, _ in sublayers if n not in chosen_names]
    model._molm_expert_parallel = info
    info0(f"expert parallel: ep_size={ep_size} world={world} ({len(info.layers)} expert-parallel MoE sub-layers"
          f", {len(info.replicated)} replicated)")
    return info
