"""How much of the routing the new experts of a grown model take, on one domain's data.

Whether new experts learn the new domain without taking over the old one shows in the routers: on
old-domain inputs the probability mass on the new experts should stay low, on new-domain inputs it
should rise. ``NewExpertShare`` measures that during a forward pass (``evaluate``) with forward hooks
on every grown MoE sub-layer (``continual_old_experts`` set by ``grow_experts``), per kind:

    new_mass_{attn,mlp}   mean over real tokens and sub-layers of sum_{e >= E_old} p(e | x)
    new_topk_{attn,mlp}   share of the top-k slots given to a new expert

Sums stay on the device; ``result()`` makes one all-reduce (through ``molm_ds.parallel.comm``) and one
host transfer, so every rank of the group must call it (each rank routes its own tokens over all
global experts, as in the monitor).
"""

from __future__ import annotations

import torch
from torch import nn

from molm_ds.model.sublayers import KINDS, moe_sublayers
from molm_ds.parallel import comm

__all__ = ["KINDS", "NewExpertShare"]

class NewExpertShare:
    """Context manager: ``with NewExpertShare(model) as share: evaluate(model, batches)`` then
    ``share.result()``. Sub-layers without new experts are not counted; a kind without any grown
    sub-layer is left out of the result."""

    def __init__(self, model: nn.Module) -> None:
        grown = [s for s in moe_sublayers(model)
                 if hasattr(s.module, "continual_old_experts") and int(s.module.num_experts) > s.module.continual_old_experts]
        self.layers = [s.module for s in grown]
        self._kind = {id(s.module): s.kind for s in grown}
        device = next(model.parameters()).device
        # per kind: probability mass on new experts, top-k slots on new experts, top-k slots, tokens
        self.sums = {k: torch.zeros(4, dtype=torch.float64, device=device) for k in KINDS}
        self.present = sorted({s.kind for s in grown}, key=KINDS.index)
        self._handles: list = []

    def _hook(self, module: nn.Module, args, output) -> None:
        rec = module.last_routing
        old = module.continual_old_experts
        mass_T = rec.probs_TE[:, old:].sum(-1).double()
        new_TK = rec.idx_TK >= old  # padded slots are -1: never new
        real_TK = rec.idx_TK >= 0
        if rec.mask_T is not None:
            mass_T = mass_T * rec.mask_T
        tokens = mass_T.new_tensor(rec.probs_TE.shape[0]) if rec.mask_T is None else rec.mask_T.sum().double()
        self.sums[self._kind[id(module)]] += torch.stack([mass_T.sum(), new_TK.sum().double(), real_TK.sum().double(), tokens])

    def __enter__(self) -> "NewExpertShare":
        self._handles = [m.register_forward_hook(self._hook) for m in self.layers]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def result(self, group=None) -> dict[str, float]:
        """{new_mass_<kind>, new_topk_<kind>} over all ranks of ``group`` (collective)."""
        if not self.present:
            return {}
        total = comm.all_reduce(torch.stack([self.sums[k] for k in self.present]), comm.ReduceOp.SUM, group)
        out = {}
        for kind, (mass, new_slots, slots, tokens) in zip(self.present, total.tolist()):  # the one host transfer
            out[f"new_mass_{kind}"] = mass / max(tokens, 1.0)
            out[f"new_topk_{kind}"] = new_slots / max(slots, 1.0)
        return out
