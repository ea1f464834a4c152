"""Expert insertion: grow every MoE sub-layer by N freshly initialised experts and the router's A by
N new rows A' (B, b shared), in a plain model or in a checkpoint.

Legend: E experts before, N new experts, D d_model, R router width.

- ``grow_experts(model, attention=N_a, mlp=N_m, seed=s)``: on a plain ``MoLM`` (before ``parallelize``).
  Stacked expert weights [E, ...] become [E + N, ...] (old rows first, untouched), ``router.w_gate``
  [E, R] becomes [E + N, R]; counts, dispatcher and ``model.config`` follow. New experts get the
  model's expert init (U(-1/fan_in, 1/fan_in)), new rows N(0, init_std), drawn from a generator seeded
  with ``seed`` (identical on every rank). Each sub-layer remembers ``continual_old_experts = E``
  (which global ids are frozen) for ``molm_ds.continual.groups``.
- ``grow_checkpoint(src, dst, attention=, mlp=, seed=)``: the same surgery on checkpoint files: writes
  a weights-only checkpoint (``molm_ds.checkpoint.write_model``) with new router rows and new
  per-expert files.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import nn

from molm_ds.log import get_logger
from molm_ds.model import MoLM
from molm_ds.model.dispatch import LocalDispatcher
from molm_ds.model.sublayers import ATTN, moe_sublayers
from molm_ds import checkpoint as ckpt

__all__ = ["grow_experts", "new_expert_counts", "grow_checkpoint"]

log = get_logger("continual")


def _new_expert_rows(w_EIO: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    fan_in = w_EIO.shape[1]  # same init as molm_ds.model.experts
    return torch.empty((n,) + tuple(w_EIO.shape[1:]), dtype=torch.float32).uniform_(
        -1.0 / fan_in, 1.0 / fan_in, generator=gen).to(w_EIO.dtype)


def router_row_std(config, router) -> float:
    """Std of a new router row (module embedding), as `Router.reset_parameters` initialises the old ones
    under `config.router_init`: fan_in N(0, 1/fan_in of A) or released N(0, init_std)."""
    if config.router_init == "fan_in":
        return float(router.w_gate.shape[1]) ** -0.5
    return float(config.init_std)


@torch.no_grad()
def grow_experts(model: MoLM, *, attention: int, mlp: int, seed: int) -> MoLM:
    """Insert ``attention`` new experts into every MoA sub-layer and ``mlp`` into every MoE MLP sub-layer
    of a plain model, in place (returned). Old experts keep ids 0..E-1 and their weights bit for bit."""
    if attention < 0 or mlp < 0:
        raise ValueError(f"grow_experts: new expert counts must be >= 0, got attention={attention}, mlp={mlp}")
    if getattr(model, "_molm_expert_parallel", None) is not None:
        raise ValueError("grow_experts: the model is already expert-parallel; insert experts into the plain model "
                         "before parallelize()")
    gen = torch.Generator().manual_seed(int(seed))
    std = model.config.init_std
    for s in model.moe_sublayers():
        layer = s.module
        n = attention if s.kind == ATTN else mlp
        E = int(layer.num_experts)
        layer.continual_old_experts = E
        if n == 0:
            continue
        experts, router = layer.experts, layer.router
        for name, p in list(experts.named_parameters(recurse=False)):
            new = _new_expert_rows(p, n, gen)
            setattr(experts, name, nn.Parameter(torch.cat([p.detach(), new.to(p.device)], 0),
                                                requires_grad=p.requires_grad))
        rows = (torch.randn((n, router.w_gate.shape[1]), generator=gen) * router_row_std(model.config, router)
                ).to(router.w_gate)
        router.w_gate = nn.Parameter(torch.cat([router.w_gate.detach(), rows], 0),
                                     requires_grad=router.w_gate.requires_grad)
        if router.expert_bias_E is not None:  # new experts start at the mean bias: no head start, no handicap
            bias = router.expert_bias_E
            router.expert_bias_E = torch.cat([bias, bias.mean().expand(n)])
        router.num_experts = layer.num_experts = E + n
        layer.dispatcher = LocalDispatcher(E + n)
    model.config = model.config.grown(attention=attention, mlp=mlp)
    log.info("inserted %d attention and %d MLP experts per layer: now %d / %d", attention, mlp,
             model.config.n_att_experts, model.config.n_mlp_experts)
    return model


def new_expert_counts(model: nn.Module) -> dict[str, tuple[int, int]]:
    """{sub-layer name: (old experts, experts now)} of a grown model."""
    out = {}
    for s in moe_sublayers(model):
        if hasattr(s.module, "continual_old_experts"):
            out[s.name] = (s.module.continual_old_experts, int(s.module.num_experts))
    return out


# ---- checkpoints ---------------------------------------------------------------------------------
def grow_checkpoint(src: str, dst_dir: str, *, attention: int, mlp: int, seed: int, tag: Optional[str] = None) -> str:
    """Offline surgery on a checkpoint: write ``dst_dir/<tag>/`` (weights only, the trainer's layout) with
    the router rows extended and one new ``layer_{L}_expert_{E}`` file per inserted expert. Loads with
    ``molm_ds.checkpoint.load_model`` (or as an ``init_from``) at any ep_size dividing the new
    counts. Returns the tag directory."""
    ckpt_dir, src_tag = ckpt.resolve(src, what="grow_checkpoint")
    model = ckpt.load_model(os.path.join(ckpt_dir, src_tag))
    grow_experts(model, attention=attention, mlp=mlp, seed=seed)
    return ckpt.write_model(model, ckpt.read_job(ckpt_dir, src_tag), dst_dir, tag=tag or src_tag, kind="grown")
