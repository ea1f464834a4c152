"""Plain-PyTorch MoLM (ModuleFormer) model: router, experts, local dispatcher, MoE layers, transformer."""

from molm_ds.model.dispatch import DispatchContext, LocalDispatcher
from molm_ds.model.experts import AttentionExperts, MLPExperts
from molm_ds.model.router import Router, RouterOutput

__all__ = ["AttentionExperts", "DispatchContext", "LocalDispatcher", "MLPExperts", "Router", "RouterOutput"]
