"""Model configuration: typed, validated, with presets and derived sizes.

Legend: D = d_model, E = experts, K = experts per token, H = expert hidden width, R = router width.

`ModelConfig` is the single source of truth for a model's shape. Presets reproduce the released MoLM
shapes (ModuleFormer, arXiv 2306.04640) and add tiny models that train in seconds on a CPU.
"""

from __future__ import annotations

from typing import Annotated, Literal, Optional, Tuple

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from molm_ds.errors import ConfigError

__all__ = ["ModelConfig", "PRESETS", "check_ep_world", "check_expert_split", "preset_names"]


def check_expert_split(num_experts: int, ep_size: int, *, what: str, hint: str = "") -> None:
    """The rule of expert parallelism, stated once: the ep_size ranks of a group share each sub-layer's
    experts evenly. ConfigError starting with ``what`` (which count, where) and naming the ep_sizes that work."""
    if num_experts % ep_size:
        ok = [d for d in range(1, num_experts + 1) if num_experts % d == 0]
        raise ConfigError(f"{what}: {num_experts} experts cannot be split over ep_size={ep_size} ranks (must divide "
                          f"evenly); choose an ep_size among {ok}{hint}")


def _list_to_tuple(v):
    return tuple(v) if isinstance(v, list) else v  # YAML and JSON have no tuples; strict mode wants one


def check_ep_world(ep_size: int, world_size: int, *, what: str = "ep_size") -> None:
    """The other rule, stated once: expert-parallel groups of ep_size ranks tile the world."""
    if world_size % ep_size:
        raise ConfigError(f"{what}={ep_size} does not divide the world size {world_size}: expert-parallel groups must "
                          f"tile the ranks; launch a multiple of {ep_size} ranks or choose an ep_size among "
                          f"{[d for d in range(1, world_size + 1) if world_size % d == 0]}")


class ModelConfig(BaseModel):
    """Shape and options of one MoLM model. Unknown keys are rejected, values are not coerced ("2", 2.0 and
    true are not integers) and floats are finite."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    vocab_size: int = Field(50295, ge=2, description="Vocabulary size (rows of wte and lm_head).")
    n_layer: int = Field(24, ge=1, description="Number of transformer blocks.")
    d_model: int = Field(1024, ge=1, description="Residual stream width D.")

    # Mixture of attention experts (MoA).
    n_att_experts: int = Field(16, ge=1, description="Attention experts per layer.")
    k_att: int = Field(2, ge=1, description="Attention experts chosen per token.")
    att_hidden: int = Field(1024, ge=1, description="Query width of one attention expert (all its heads).")
    n_head: int = Field(1, ge=1, description="Heads per attention expert; head dim = att_hidden / n_head.")
    kv_proj: bool = Field(
        False, description="Shared K/V projections D->att_hidden (with bias, as in the released code). MoLM has none: K = V = LN1(x) (needs att_hidden == d_model)."
    )
    stickbreaking_include_current: bool = Field(
        True,
        description="True: MoLM variant (token i attends j <= i, leftover mass dropped). "
        "False: arXiv 2410.17980 variant (j < i, leftover mass goes to the current token's value).",
    )

    # Mixture of MLP experts.
    n_mlp_experts: int = Field(32, ge=1, description="MLP experts per layer.")
    k_mlp: int = Field(2, ge=1, description="MLP experts chosen per token.")
    ffd_hidden: int = Field(2048, ge=1, description="Hidden width H of one MLP expert.")
    mlp_activation: Literal["gelu_tanh", "swiglu"] = Field(
        "gelu_tanh", description="MoLM: W2 gelu_tanh(W1 x). swiglu: W2 (silu(W1 x) * W3 x)."
    )

    # Routers (one per MoE sub-layer).
    gating_size: int = Field(256, ge=1, description="Router width R: logits = A gelu(B x + b), B: D->R.")
    router_type: Literal["molm", "linear"] = Field("molm", description="molm: two-layer router; linear: logits = A x.")
    router_init: Literal["fan_in", "released"] = Field(
        "fan_in",
        description="Router initialisation. fan_in: B ~ N(0, 1/d_model), A ~ N(0, 1/gating_size) (linear router: "
        "A ~ N(0, 1/d_model)), b = 0: logits are O(1) at any width, so every router leaves the uniform point. "
        "released: N(0, init_std) like every nn.Linear of the released code; below MoLM's width (d_model 1024, "
        "gating 256) the routers then start uniform and, under MoLM's full-softmax gates, the MLP routers never "
        "learn (docs/router_learning.md). Initialisation only: loaded checkpoints compute the same either way.",
    )
    renormalize_topk: bool = Field(
        False, description="Renormalise the chosen gates to sum to 1. MoLM checkpoints need False."
    )
    sample_topk: int = Field(
        0, ge=0, description="While training, sample this many of the k experts from the softmax (Gumbel); 0 = plain top-k."
    )
    routing: Literal["token_choice", "expert_choice"] = Field(
        "token_choice",
        description="token_choice: each token takes its top-k. expert_choice: each expert takes its top-c tokens "
        "(non-causal: training only; inference falls back to token_choice).",
    )
    router_balance: Literal["none", "bias"] = Field(
        "none",
        description="bias: auxiliary-loss-free balancing (DeepSeek-V3): a per-expert bias (a buffer, not a parameter) is "
        "added to p(m|x) to choose the top-k only (gates stay the unbiased probabilities) and, after every applied "
        "optimizer step, moves by router_bias_rate towards equal load: b_m += rate * sign(mean load - load_m), loads "
        "summed over the step's micro-batches and all data-parallel ranks. Alone or beside the MI/Switch losses. "
        "Needs routing: token_choice and sample_topk: 0. See docs/model.md.",
    )
    router_bias_rate: float = Field(
        1e-3, ge=0, description="Update rate of the balancing bias per optimizer step (router_balance: bias); "
        "0 freezes the bias (a loaded bias still routes)."
    )
    capacity_factor: Optional[float] = Field(
        None, gt=0, description="Expert capacity = factor * tokens * k / E; overflow tokens are dropped "
        "(training only; eval is dropless). None = dropless."
    )

    # Pruned models (molm_ds.prune): layers may keep different numbers of experts.
    att_experts_per_layer: Optional[Annotated[Tuple[int, ...], BeforeValidator(_list_to_tuple)]] = Field(
        None, description="Attention experts of each layer (length n_layer, each in [1, n_att_experts]); "
        "None = n_att_experts everywhere. k_att is capped at a layer's count."
    )
    mlp_experts_per_layer: Optional[Annotated[Tuple[int, ...], BeforeValidator(_list_to_tuple)]] = Field(
        None, description="MLP experts of each layer (length n_layer, each in [1, n_mlp_experts]); "
        "None = n_mlp_experts everywhere. k_mlp is capped at a layer's count."
    )

    layer_norm_eps: float = Field(1e-5, gt=0, description="LayerNorm epsilon.")
    init_std: float = Field(0.02, gt=0, description="Std of the normal initialiser.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the residual branches (0 in MoLM pretraining).")

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        if self.k_att > self.n_att_experts:
            raise ValueError(
                f"k_att={self.k_att} is larger than n_att_experts={self.n_att_experts}: lower k_att or add experts"
            )
        if self.k_mlp > self.n_mlp_experts:
            raise ValueError(
                f"k_mlp={self.k_mlp} is larger than n_mlp_experts={self.n_mlp_experts}: lower k_mlp or add experts"
            )
        if self.att_hidden % self.n_head:
            raise ValueError(f"att_hidden={self.att_hidden} must be divisible by n_head={self.n_head}")
        if not self.kv_proj and self.att_hidden != self.d_model:
            raise ValueError(
                f"without kv_proj, K = V = LN(x) so att_hidden ({self.att_hidden}) must equal d_model "
                f"({self.d_model}): set att_hidden={self.d_model} or kv_proj: true"
            )
        if self.router_balance == "bias" and (self.routing != "token_choice" or self.sample_topk):
            raise ValueError("router_balance: bias shifts a token-choice top-k; it needs routing: token_choice and "
                             f"sample_topk: 0 (got routing: {self.routing}, sample_topk: {self.sample_topk})")
        if self.sample_topk > min(self.k_att, self.k_mlp):
            raise ValueError(f"sample_topk={self.sample_topk} must be <= k_att and k_mlp")
        for name, counts, full in (("att_experts_per_layer", self.att_experts_per_layer, self.n_att_experts),
                                   ("mlp_experts_per_layer", self.mlp_experts_per_layer, self.n_mlp_experts)):
            if counts is None:
                continue
            if len(counts) != self.n_layer:
                raise ValueError(f"{name} has {len(counts)} entries but n_layer={self.n_layer}: give one count per layer")
            if any(not 1 <= c <= full for c in counts):
                raise ValueError(f"{name}={list(counts)}: every count must be in [1, {full}] (the unpruned expert count)")
            if self.sample_topk > min(counts):
                raise ValueError(f"sample_topk={self.sample_topk} must be <= the smallest layer's experts ({min(counts)})")
        return self

    # ---- per-layer expert counts (differ only in pruned models) ------------------------------------
    def att_experts_at(self, layer: int) -> int:
        return self.n_att_experts if self.att_experts_per_layer is None else self.att_experts_per_layer[layer]

    def mlp_experts_at(self, layer: int) -> int:
        return self.n_mlp_experts if self.mlp_experts_per_layer is None else self.mlp_experts_per_layer[layer]

    def expert_parallel_counts(self, *, replicate_attention_experts: bool) -> dict[str, int]:
        """{field: experts} of what expert parallelism splits over ep_size ranks: the MLP experts always,
        the attention experts unless replicated (per layer where pruning left the layers different)."""
        kinds = [("n_mlp_experts", "mlp_experts_per_layer", self.n_mlp_experts, self.mlp_experts_per_layer)]
        if not replicate_attention_experts:
            kinds.append(("n_att_experts", "att_experts_per_layer", self.n_att_experts, self.att_experts_per_layer))
        out: dict[str, int] = {}
        for name, per_name, full, per in kinds:
            out.update({name: full} if per is None else {f"{per_name}[{i}]": c for i, c in enumerate(per)})
        return out

    def k_att_at(self, layer: int) -> int:
        return min(self.k_att, self.att_experts_at(layer))

    def k_mlp_at(self, layer: int) -> int:
        return min(self.k_mlp, self.mlp_experts_at(layer))

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.att_hidden // self.n_head

    @property
    def _mlp_in_width(self) -> int:
        return 2 * self.ffd_hidden if self.mlp_activation == "swiglu" else self.ffd_hidden

    def _router_params(self, n_experts: int) -> int:
        if self.router_type == "linear":
            return self.d_model * n_experts
        return self.d_model * self.gating_size + self.gating_size + self.gating_size * n_experts

    @property
    def att_expert_params(self) -> int:
        """Parameters of one attention expert (its W_q and W_o)."""
        return 2 * self.d_model * self.att_hidden

    @property
    def mlp_expert_params(self) -> int:
        """Parameters of one MLP expert (W1 [and W3], W2)."""
        return self.d_model * self._mlp_in_width + self.ffd_hidden * self.d_model

    def _layer_shared_params(self, layer: int) -> int:
        kv = 2 * (self.d_model + 1) * self.att_hidden if self.kv_proj else 0  # with bias, as released
        ln = 2 * 2 * self.d_model
        return kv + ln + self._router_params(self.att_experts_at(layer)) + self._router_params(self.mlp_experts_at(layer))

    @property
    def embedding_params(self) -> int:
        """wte + untied lm_head."""
        return 2 * self.vocab_size * self.d_model

    @property
    def total_params(self) -> int:
        layers = sum(
            self._layer_shared_params(i)
            + self.att_experts_at(i) * self.att_expert_params
            + self.mlp_experts_at(i) * self.mlp_expert_params
            for i in range(self.n_layer)
        )
        return layers + self.embedding_params + 2 * self.d_model  # + ln_f

    @property
    def active_params(self) -> int:
        """Parameters touched by one token (k experts of each kind, all routers, embeddings)."""
        layers = sum(
            self._layer_shared_params(i)
            + self.k_att_at(i) * self.att_expert_params
            + self.k_mlp_at(i) * self.mlp_expert_params
            for i in range(self.n_layer)
        )
        return layers + self.embedding_params + 2 * self.d_model

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (forward + backward): 6 x active matmul params (the wte lookup is
        free) + attention scores and values, 12 * layers * k_att * att_hidden * seq_len (PaLM's
        convention; the causal half is not subtracted)."""
        matmul_params = self.active_params - self.vocab_size * self.d_model
        k_att = sum(self.k_att_at(i) for i in range(self.n_layer))
        return 6 * matmul_params + 12 * k_att * self.att_hidden * seq_len

    def grown(self, *, attention: int = 0, mlp: int = 0) -> "ModelConfig":
        """This config with ``attention`` / ``mlp`` more experts per layer (continual learning)."""
        if not attention and not mlp:
            return self
        return ModelConfig(**{**self.model_dump(), "n_att_experts": self.n_att_experts + attention,
                              "n_mlp_experts": self.n_mlp_experts + mlp})

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; valid presets: {', '.join(preset_names())}")
        return cls(**{**PRESETS[name], **overrides})


# The released shapes keep the released router init: the fan_in default was chosen from runs of the tiny and
# small presets (docs/router_learning.md), and no run at this width (d_model 1024, gating 256) has been made
# to justify changing it there (docs/science.md, "Router initialisation").
_MOLM = dict(
    vocab_size=50295, d_model=1024, n_att_experts=16, att_hidden=1024, n_head=1,
    n_mlp_experts=32, ffd_hidden=2048, gating_size=256, router_init="released",
)

PRESETS: dict[str, dict] = {
    # Trains in seconds on a CPU; used by tests and the demo.
    "tiny": dict(
        vocab_size=512, n_layer=2, d_model=64, n_att_experts=4, k_att=2, att_hidden=64, n_head=2,
        n_mlp_experts=4, k_mlp=2, ffd_hidden=128, gating_size=32,
    ),
    # A little larger, for the demo and CPU benchmarks.
    "small": dict(
        vocab_size=4096, n_layer=4, d_model=128, n_att_experts=4, k_att=2, att_hidden=128, n_head=4,
        n_mlp_experts=8, k_mlp=2, ffd_hidden=256, gating_size=64,
    ),
    "molm-350m-4b": dict(_MOLM, n_layer=24, k_att=2, k_mlp=2),
    "molm-700m-4b": dict(_MOLM, n_layer=24, k_att=4, k_mlp=4),
    "molm-700m-8b": dict(_MOLM, n_layer=48, k_att=2, k_mlp=2),
}


def preset_names() -> list[str]:
    return list(PRESETS)
