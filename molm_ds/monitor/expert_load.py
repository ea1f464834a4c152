"""Collect expert-load sums from the MoE sub-layers of a model, then reduce them across ranks.

The statistics come from the MoE modules themselves: every MoE sub-layer (`MoEMLP`,
`MixtureOfAttention`) keeps `last_routing` (detached probs_TE, idx_TK, token mask) after its forward;
`ExpertLoadTracker` puts a forward hook on each one and adds that routing to per-sub-layer `LoadSums`
(on the model's device, no host sync). The training loop only calls `reduce()` when it logs.

The same hooks add each MoLM router's `last_hidden` (its hidden GELU units in that forward, see
`molm_ds.model.router.HiddenUnitRecord`) to per-sub-layer `RouterUnitSums`; they travel in the same
all-reduce.

Counted: forwards in training mode that are not activation-checkpoint recomputations inside backward.
Not counted: eval/validation forwards, generation. Reduction: one SUM all-reduce of all sums over the
group (default world = every data- and expert-parallel rank, each of which routes its own tokens over
all global experts), so the result equals a single process counting the whole global batch.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from molm_ds.log import get_logger
from molm_ds.model.sublayers import SubLayer, moe_sublayers
from molm_ds.parallel import comm
from molm_ds.monitor.stats import LoadSums, RouterUnitSums

__all__ = ["SubLayer", "ExpertLoadTracker"]

log = get_logger("monitor")


def _in_backward() -> bool:
    """True while autograd runs backward (e.g. an activation-checkpoint recomputation)."""
    fn = getattr(torch._C, "_current_graph_task_id", None)
    return fn is not None and fn() != -1


def _router_width(module: nn.Module) -> Optional[int]:
    """Hidden width R of the sub-layer's MoLM router, None for a linear router (no hidden units)."""
    proj = getattr(getattr(module, "router", None), "proj", None)
    return None if proj is None else proj.out_features


def _routing_sums(module: nn.Module) -> LoadSums:
    r = module.last_routing
    return LoadSums.from_routing(
        probs_TE=r.probs_TE, idx_TK=r.idx_TK, mask_T=getattr(r, "mask_T", None), num_experts=module.num_experts
    )


class ExpertLoadTracker:
    """Accumulates `LoadSums` per MoE sub-layer of `model` between `reset()` calls.

    >>> tracker = ExpertLoadTracker(model)      # hooks every MoE sub-layer
    >>> ... forward/backward/step ...           # sums accumulate on the model's device
    >>> sums = tracker.reduce(group=None)       # {SubLayer: LoadSums}, all-reduced (SUM) over the group
    >>> tracker.reset()
    """

    def __init__(self, model: nn.Module, *, hooks: bool = True):
        self.modules: dict[SubLayer, nn.Module] = {s.key: s.module for s in moe_sublayers(model)}
        if not self.modules:
            log.warning("ExpertLoadTracker: the model has no MoE sub-layers (MoEMLP / MixtureOfAttention)")
        self._sums: dict[SubLayer, Optional[LoadSums]] = {k: None for k in self.modules}
        self._widths = {k: w for k, m in self.modules.items() if (w := _router_width(m)) is not None}
        self._units: dict[SubLayer, Optional[RouterUnitSums]] = {k: None for k in self._widths}
        self._handles = []
        self.forwards = 0
        if hooks:
            for key, m in self.modules.items():
                self._handles.append(m.register_forward_hook(self._make_hook(key)))

    @property
    def sublayers(self) -> list[SubLayer]:
        return sorted(self.modules)

    def _make_hook(self, key: SubLayer):
        def hook(module, args, output):
            # compiled (training.compile): the hook is traced into the forward graph, which a
            # checkpoint recomputation does not rerun
            if module.training and (torch.compiler.is_compiling() or not _in_backward()):
                self.observe(key)

        return hook

    def observe(self, key: Optional[SubLayer] = None) -> None:
        """Add the current `last_routing` of one sub-layer (or of all, when key is None)."""
        for k in [key] if key is not None else self.sublayers:
            s = _routing_sums(self.modules[k])
            self._sums[k] = s if self._sums[k] is None else self._sums[k] + s
            record = getattr(self.modules[k].router, "last_hidden", None) if k in self._units else None
            if record is not None:
                u = RouterUnitSums.from_record(record)
                self._units[k] = u if self._units[k] is None else self._units[k] + u
        self.forwards += 1

    def local_sums(self) -> dict[SubLayer, LoadSums]:
        """This rank's sums (zeros for a sub-layer that has not run)."""
        out = {}
        for k in self.sublayers:
            s = self._sums[k]
            out[k] = s if s is not None else LoadSums.zeros(self.modules[k].num_experts)
        return out

    def local_router_sums(self) -> dict[SubLayer, RouterUnitSums]:
        """This rank's router hidden-unit sums, for the sub-layers with a MoLM router."""
        return {k: u if (u := self._units[k]) is not None else RouterUnitSums.zeros(self._widths[k])
                for k in sorted(self._units)}

    def reduce(self, group=None) -> dict[SubLayer, LoadSums]:
        """All-reduce (SUM) every sub-layer's sums over `group` in one collective; every rank must call
        it at the same step. Returns CPU float64 sums."""
        return self.reduce_with_router_units(group)[0]

    def reduce_with_router_units(self, group=None) -> tuple[dict[SubLayer, LoadSums], dict[SubLayer, RouterUnitSums]]:
        """`reduce`, plus the routers' hidden-unit sums, in the same single SUM all-reduce."""
        local, units = self.local_sums(), self.local_router_sums()
        if not local:
            return {}, {}
        parts = [local[k].flatten().cpu() for k in local] + [units[k].flatten().cpu() for k in units]
        flat = comm.all_reduce(torch.cat(parts), comm.ReduceOp.SUM, group)
        out, out_units, offset = {}, {}, 0
        for k in local:
            E = local[k].num_experts
            out[k] = LoadSums.unflatten(flat[offset : offset + 2 * E + 4], E)
            offset += 2 * E + 4
        for k in units:
            R = units[k].width
            out_units[k] = RouterUnitSums.unflatten(flat[offset : offset + R + 2], R)
            offset += R + 2
        return out, out_units

    def reset(self) -> None:
        self._sums = {k: None for k in self.modules}
        self._units = {k: None for k in self._widths}
        self.forwards = 0

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
