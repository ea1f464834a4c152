"""Expert parallelism on DeepSpeed: groups, all-to-all dispatcher, DeepSpeed-MoE bridge, param groups,
expert-aware gradient clipping and the expert checkpoint layout. See docs/parallel.md."""

from molm_ds.parallel.all_to_all import all_to_all_variable, exchange_counts
from molm_ds.parallel.bridge import EXPERT_KEY, is_deepspeed_moe_bridge, to_deepspeed_moe
from molm_ds.parallel.checkpoint import check_expert_files, expert_file, list_expert_files, load_weights
from molm_ds.parallel.clip import clip_grad_norm_, fix_grad_clipping, grad_norm, grad_norm_reference
from molm_ds.parallel.dispatch import AllToAllDispatcher
from molm_ds.parallel.groups import (
    check_expert_parallel, check_zero_stage, ensure_distributed, expert_parallel_groups, group_name,
)
from molm_ds.parallel.optim import build_param_groups
from molm_ds.parallel.parallelize import ExpertParallelInfo, MoELayerInfo, find_moe_sublayers, parallelize

__all__ = [
    "AllToAllDispatcher", "EXPERT_KEY", "ExpertParallelInfo", "MoELayerInfo", "all_to_all_variable",
    "build_param_groups", "check_expert_files", "check_expert_parallel", "check_zero_stage", "clip_grad_norm_",
    "ensure_distributed", "exchange_counts", "expert_file", "expert_parallel_groups", "find_moe_sublayers",
    "fix_grad_clipping", "grad_norm", "grad_norm_reference", "group_name", "is_deepspeed_moe_bridge",
    "list_expert_files", "load_weights", "parallelize", "to_deepspeed_moe",
]
