"""Hugging Face configuration of a MoLM (ModuleFormer) exported by molm-ds.

This file is copied into every exported directory and loaded by ``transformers`` with
``trust_remote_code=True``; it imports nothing from molm-ds. The keys of the released ModuleFormer
configuration keep their names (``n_embd``, ``n_att_experts``, ``k_att``, ...), so a directory whose
model the released code can build also loads there; the keys the released code lacks describe what
it cannot represent (per-layer expert counts of pruned models, K/V projections chosen freely, the
2410.17980 stick-breaking variant, SwiGLU experts, renormalised gates).
"""

from __future__ import annotations

from typing import Optional, Sequence

from transformers import PretrainedConfig


class MoLMConfig(PretrainedConfig):
    """Shape of a MoLM. Per layer ``i`` the attention sub-layer has ``n_att_experts_per_layer[i]``
    experts (``n_att_experts`` when the list is absent) of which ``min(k_att, count)`` are chosen per
    token; the same for the MLP sub-layer."""

    model_type = "molm"
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {"hidden_size": "n_embd", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head",
                     "max_position_embeddings": "n_positions"}

    def __init__(
        self,
        vocab_size: int = 50295,
        n_layer: int = 24,
        n_embd: int = 1024,
        n_head: int = 1,
        att_hidden: int = 1024,
        ffd_hidden: int = 2048,
        n_att_experts: int = 16,
        k_att: int = 2,
        n_mlp_experts: int = 32,
        k_mlp: int = 2,
        gating_size: int = 256,
        gate_type: str = "mlp",
        activation_function: str = "gelu_new",
        layer_norm_epsilon: float = 1e-5,
        initializer_range: float = 0.02,
        router_init: str = "released",
        n_positions: int = 2048,
        kv_proj: Optional[bool] = None,
        stickbreaking_include_current: bool = True,
        renormalize_topk: bool = False,
        router_balance: str = "none",
        n_att_experts_per_layer: Optional[Sequence[int]] = None,
        n_mlp_experts_per_layer: Optional[Sequence[int]] = None,
        use_cache: bool = True,
        bos_token_id: Optional[int] = None,
        eos_token_id: Optional[int] = None,
        pad_token_id: Optional[int] = None,
        tie_word_embeddings: bool = False,
        **kwargs,
    ) -> None:
        self.vocab_size = vocab_size
        self.n_layer = n_layer
        self.n_embd = n_embd
        self.n_head = n_head
        self.att_hidden = att_hidden
        self.ffd_hidden = ffd_hidden
        self.n_att_experts = n_att_experts
        self.k_att = k_att
        self.n_mlp_experts = n_mlp_experts
        self.k_mlp = k_mlp
        self.gating_size = gating_size
        self.gate_type = gate_type  # "mlp": A gelu(B x + b); "linear": A x
        self.activation_function = activation_function  # "gelu_new" (tanh GELU) or "swiglu"
        self.layer_norm_epsilon = layer_norm_epsilon
        self.initializer_range = initializer_range
        # Router init of a fresh model, as molm_ds.config.ModelConfig.router_init: "fan_in" (B ~ N(0, 1/D),
        # A ~ N(0, 1/R)) or "released" (N(0, initializer_range), the released code's). Absent in released configs.
        if router_init not in ("fan_in", "released"):
            raise ValueError(f"router_init must be 'fan_in' or 'released', got {router_init!r}")
        self.router_init = router_init
        self.n_positions = n_positions  # the context length the model was trained on (no position embedding)
        # The released rule: shared K/V projections exactly when att_hidden != n_embd or n_head > 1.
        self.kv_proj = (att_hidden != n_embd or n_head > 1) if kv_proj is None else bool(kv_proj)
        self.stickbreaking_include_current = stickbreaking_include_current
        self.renormalize_topk = renormalize_topk
        self.router_balance = router_balance  # "bias": each gate has an expert_bias [E] added for top-k selection
        self.n_att_experts_per_layer = list(n_att_experts_per_layer) if n_att_experts_per_layer is not None else None
        self.n_mlp_experts_per_layer = list(n_mlp_experts_per_layer) if n_mlp_experts_per_layer is not None else None
        self.use_cache = use_cache
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)

    def att_experts_at(self, layer: int) -> int:
        return self.n_att_experts if self.n_att_experts_per_layer is None else self.n_att_experts_per_layer[layer]

    def mlp_experts_at(self, layer: int) -> int:
        return self.n_mlp_experts if self.n_mlp_experts_per_layer is None else self.n_mlp_experts_per_layer[layer]


class MoLMModuleFormerConfig(MoLMConfig):
    """The same configuration under the released ``model_type``, for exports the released ModuleFormer
    code can also build (so ``AutoConfig.register("moduleformer", ...)`` users get theirs)."""

    model_type = "moduleformer"

    def __init__(self, **kwargs) -> None:  # explicit: transformers 5 gives a subclass without one a dataclass __init__
        super().__init__(**kwargs)
