"""Continual learning (ModuleFormer §6): insert new experts and router rows into a trained model, train
them with frozen old experts (strategies ``full_router`` / ``new_only``), regularise the new router rows,
optionally distil from the starting model. See docs/continual.md."""

from molm_ds.continual.config import ContinualSection, grown_config
from molm_ds.continual.groups import apply_strategy, continual_param_groups, register_row_mask, trainable_rows
from molm_ds.continual.losses import distillation_kl, distillation_kl_reference, new_router_rows_penalty
from molm_ds.continual.surgery import (
    checkpoint_model_config, grow_checkpoint, grow_experts, load_checkpoint_model, new_expert_counts,
    resolve_checkpoint,
)

__all__ = [
    "ContinualSection", "apply_strategy", "checkpoint_model_config", "continual_param_groups", "distillation_kl",
    "distillation_kl_reference", "grow_checkpoint", "grow_experts", "grown_config", "load_checkpoint_model",
    "new_expert_counts", "new_router_rows_penalty", "register_row_mask", "resolve_checkpoint", "trainable_rows",
]
