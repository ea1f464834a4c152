"""Expert parallelism on DeepSpeed and the one door to the network. See docs/parallel.md.

- ``comm``: every collective except the expert all-to-all (declared reduce ops, backend devices);
- ``groups``: DeepSpeed's expert-parallel groups and the checks that must fail before any work;
- ``dispatch`` / ``all_to_all``: the all-to-all dispatcher (same contract as the local one);
- ``bridge`` / ``expert_parallel``: stacked experts presented to DeepSpeed's engine as its MoE layers;
- ``optim`` / ``clip``: DeepSpeed-split param groups, expert-aware gradient norm.

Names are imported lazily, so ``molm_ds.parallel.comm`` does not pull in DeepSpeed.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "all_to_all_variable": "all_to_all", "exchange_counts": "all_to_all",
    "is_deepspeed_moe_bridge": "bridge", "to_deepspeed_moe": "bridge",
    "clip_grad_norm_": "clip", "grad_norm": "clip", "grad_norm_reference": "clip", "guard_plain_optimizer": "clip",
    "AllToAllDispatcher": "dispatch",
    "check_expert_parallel": "groups", "ensure_distributed": "groups",
    "expert_parallel_groups": "groups", "group_name": "groups",
    "build_param_groups": "optim",
    "ExpertParallelInfo": "expert_parallel", "MoELayerInfo": "expert_parallel",
    "parallelize": "expert_parallel",
}

__all__ = sorted(_EXPORTS) + ["comm"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
