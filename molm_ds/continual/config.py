"""The ``continual`` section of a job file (and what ``init_from`` means). Pure pydantic, no torch.

    init_from: runs/prose/checkpoints          # a checkpoint directory (newest complete tag) or a tag
    continual:
      attention: 2            # new attention experts per layer (>= 0)
      mlp: 2                  # new MLP experts per layer (>= 0)
      strategy: new_only      # or full_router
      router_reg_weight: 0.01 # lambda * ||A'||_F^2, summed over MoE sub-layers
      lr: {new_experts: 3.0e-3, router: 1.0e-3, others: 3.0e-4}
      distill_weight: 0.0     # Lifelong-MoE KL(teacher || student) on the logits, teacher = starting model
      eval: {old: [data/embedded/shards/prose], new: [data/embedded/shards/code]}

``model`` in such a job describes the STARTING model (what the checkpoint holds); the model the job
trains has ``attention`` / ``mlp`` more experts per layer (``JobConfig.build_model_config()``).
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from molm_ds.config import ModelConfig

__all__ = ["ContinualSection", "ContinualLR", "ContinualEval", "STRATEGIES", "grown_config"]

STRATEGIES = ("full_router", "new_only")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ContinualLR(_Section):
    """Peak learning rates per parameter group (null = training.lr); all follow training's schedule."""

    new_experts: Optional[float] = Field(None, gt=0, description="The inserted experts.")
    router: Optional[float] = Field(None, gt=0, description="Router parameters that train (all of them, or A' only).")
    others: Optional[float] = Field(None, gt=0, description="Embeddings, norms, lm_head, shared K/V (if train_others).")


class ContinualEval(_Section):
    """Validation sources for the before/after perplexities (shard directories or Megatron prefixes)."""

    old: list[str] = Field(default_factory=list, description="Old-domain sources (forgetting).")
    new: list[str] = Field(default_factory=list, description="New-domain sources (learning).")


class ContinualSection(_Section):
    """Insert new experts into the ``init_from`` model and train only some parameter groups."""

    attention: int = Field(0, description="New attention experts per layer (>= 0).")
    mlp: int = Field(0, description="New MLP experts per layer (>= 0).")
    strategy: Literal["full_router", "new_only"] = Field(
        "new_only", description="full_router: new experts + every router parameter train, old experts frozen. "
        "new_only: only the new experts and the new router rows A' train, everything else frozen.")
    train_others: bool = Field(
        False, description="full_router only: also train embeddings, norms, lm_head and shared K/V (lr.others).")
    router_reg_weight: float = Field(0.0, ge=0, description="Weight of ||A'||_F^2 (new router rows), summed over sub-layers.")
    lr: ContinualLR = Field(default_factory=ContinualLR)
    distill_weight: float = Field(0.0, ge=0, description="Weight of KL(starting model || trained model) on the logits (0 = off).")
    distill_temperature: float = Field(1.0, gt=0, description="Softmax temperature of the distillation KL.")
    init_seed: Optional[int] = Field(None, description="Seed of the new experts' init (null = training.seed).")
    eval: ContinualEval = Field(default_factory=ContinualEval)

    @model_validator(mode="after")
    def _check(self) -> "ContinualSection":
        for kind in ("attention", "mlp"):
            n = getattr(self, kind)
            if n < 0:
                raise ValueError(f"continual.{kind}={n}: the number of new experts per layer must be >= 0")
        if self.attention + self.mlp == 0:
            raise ValueError("continual: add at least one expert (continual.attention or continual.mlp > 0); "
                             "for a warm start without new experts use init_from alone")
        if self.train_others and self.strategy == "new_only":
            raise ValueError("continual.train_others=true contradicts strategy new_only (everything but the new "
                             "experts and A' is frozen): use strategy full_router or drop train_others")
        return self

    def check_ep_size(self, start: ModelConfig, *, ep_size: int, replicate_attention_experts: bool) -> None:
        """ValueError unless ep_size divides every expert-parallel expert count after insertion."""
        kinds = [("mlp", start.n_mlp_experts, self.mlp)]
        if not replicate_attention_experts:
            kinds.append(("attention", start.n_att_experts, self.attention))
        for kind, old, new in kinds:
            if (old + new) % ep_size:
                ok = [n for n in range(0, 4 * ep_size + 1) if (old + n) % ep_size == 0][:3]
                raise ValueError(
                    f"continual.{kind}={new}: {old} + {new} = {old + new} {kind} experts per layer cannot be split over "
                    f"parallel.ep_size={ep_size}; insert a number of experts among {ok} or change ep_size"
                    + (" (or set parallel.replicate_attention_experts: true)" if kind == "attention" else ""))


def grown_config(cfg: ModelConfig, *, attention: int, mlp: int) -> ModelConfig:
    """The config after inserting ``attention`` / ``mlp`` experts per layer (validated)."""
    return ModelConfig(**{**cfg.model_dump(), "n_att_experts": cfg.n_att_experts + attention,
                          "n_mlp_experts": cfg.n_mlp_experts + mlp})
