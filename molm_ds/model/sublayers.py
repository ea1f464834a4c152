"""What a MoE sub-layer is, decided once: the model publishes its list and everything else asks it.

A MoLM has two MoE sub-layers per block, in this order: block 0 attention, block 0 MLP, block 1
attention, ... (``MoLM.moe_sublayers()``). A sub-layer's kind has one vocabulary everywhere: ``"attn"``
(mixture of attention experts, stacked ``w_q``, ``w_o``) and ``"mlp"`` (MoE MLP, stacked ``w1``,
``w2``). Parallelism, the monitor, checkpoints, the optimizer state, pruning and continual surgery take
the list from the model instead of guessing from module or parameter names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

__all__ = ["ATTN", "MLP", "KINDS", "SubLayer", "MoESubLayer", "moe_sublayers", "stacked_expert_params", "unwrap"]

ATTN, MLP = "attn", "mlp"
KINDS = (ATTN, MLP)


@dataclass(frozen=True, order=True)
class SubLayer:
    """One MoE sub-layer's identity: transformer block index and kind (``"attn"`` or ``"mlp"``)."""

    layer: int
    kind: str

    @property
    def tag(self) -> str:
        return f"L{self.layer:02d}/{self.kind}"


@dataclass(frozen=True)
class MoESubLayer:
    """One MoE sub-layer of a model: its identity, its qualified name in the model and the module
    (``MixtureOfAttention`` or ``MoEMLP``: ``router``, ``experts``, ``dispatcher``, ``num_experts``)."""

    key: SubLayer
    name: str  # e.g. "blocks.0.attn"
    module: nn.Module = field(compare=False, repr=False)

    @property
    def layer(self) -> int:
        return self.key.layer

    @property
    def kind(self) -> str:
        return self.key.kind

    def stacked_params(self) -> list[str]:
        """Qualified names of this sub-layer's stacked expert weights [E, ...] (first dim = expert)."""
        return [f"{self.name}.experts.{n}" for n, _ in self.module.experts.named_parameters(recurse=False)]


def unwrap(model: nn.Module) -> nn.Module:
    """The MoLM inside ``model`` (itself, or held as ``.module`` / ``._orig_mod`` by DeepSpeed's engine
    or ``torch.compile``); ``model`` itself when none publishes its sub-layers."""
    m = model
    for _ in range(4):
        if callable(getattr(type(m), "moe_sublayers", None)):
            return m
        m = getattr(m, "_orig_mod", None) or getattr(m, "module", None)
        if not isinstance(m, nn.Module):
            break
    return model


def moe_sublayers(model: nn.Module) -> list[MoESubLayer]:
    """The MoE sub-layers ``model`` publishes (names relative to the MoLM); [] for a model without any."""
    m = unwrap(model)
    return list(m.moe_sublayers()) if callable(getattr(type(m), "moe_sublayers", None)) else []


def stacked_expert_params(model: nn.Module) -> set[str]:
    """Qualified names of every stacked expert weight of ``model``."""
    return {n for s in moe_sublayers(model) for n in s.stacked_params()}
