"""Plain-PyTorch MoLM (ModuleFormer) model: router, experts, local dispatcher, MoE layers, transformer."""

from molm_ds.model.attention import MixtureOfAttention
from molm_ds.model.build import build_model
from molm_ds.model.dispatch import DispatchPlan, LocalDispatcher
from molm_ds.model.experts import AttentionExperts, MLPExperts
from molm_ds.model.generate import generate
from molm_ds.model.moe import AUX_KEYS, MoEMLP, RoutingRecord
from molm_ds.model.router import Router, RouterOutput
from molm_ds.model.sublayers import KINDS, MoESubLayer, SubLayer, moe_sublayers
from molm_ds.model.transformer import Block, MoLM, MoLMOutput

__all__ = [
    "AUX_KEYS", "AttentionExperts", "Block", "DispatchPlan", "LocalDispatcher", "MLPExperts",
    "KINDS", "MixtureOfAttention", "MoESubLayer", "MoEMLP", "MoLM", "MoLMOutput", "Router", "RouterOutput", "RoutingRecord", "SubLayer", "build_model", "generate", "moe_sublayers",
]
