"""Continual learning (ModuleFormer §6): insert new experts and router rows into a trained model, train
them with frozen old experts (strategies ``full_router`` / ``new_only``), regularise the new router rows,
optionally distil from the starting model. See docs/continual.md. The job section's schema is
``molm_ds.train.job.ContinualSection``; the trainer runs it with ``molm_ds.continual.recipe.ContinualRecipe``,
which is not imported here: surgery, groups and losses need no trainer."""

from molm_ds.continual.groups import apply_strategy, continual_param_groups, register_row_mask, trainable_rows
from molm_ds.continual.losses import distillation_kl, distillation_kl_reference, new_router_rows_penalty
from molm_ds.continual.surgery import grow_checkpoint, grow_experts, new_expert_counts

__all__ = [
    "apply_strategy", "continual_param_groups", "distillation_kl", "distillation_kl_reference",
    "grow_checkpoint", "grow_experts", "new_expert_counts", "new_router_rows_penalty", "register_row_mask",
    "trainable_rows",
]
