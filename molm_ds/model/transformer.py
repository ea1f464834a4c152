"""The MoLM transformer: pre-LN blocks of MoA + MoE MLP, no positional embedding, ln_f, untied lm_head.

Legend: B batch, T new tokens, S = past + T, D d_model, V vocab.

    h   = x + MoA(LN1(x))
    out = h + MoE_MLP(LN2(h))
"""

from __future__ import annotations

from typing import Iterator, NamedTuple, Optional

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from molm_ds.config import ModelConfig
from molm_ds.model.attention import KVCache, MixtureOfAttention
from molm_ds.model.moe import AUX_KEYS, MoEMLP
from molm_ds.model.sublayers import ATTN, MLP, MoESubLayer, SubLayer


class MoLMOutput(NamedTuple):
    logits: Tensor  # [B, T, V]
    aux: dict  # sums over layers and sub-layers: mi, load_concentration, switch, z (scalar tensors)
    past_key_values: Optional[list]  # one (k, v) per layer when use_cache, else None


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int = 0) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.attn = MixtureOfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.mlpf = MoEMLP(config, layer)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x_BTD, mask_BT=None, key_mask_BS=None, past: Optional[KVCache] = None):
        a, aux_att, present = self.attn(self.ln_1(x_BTD), mask_BT, key_mask_BS, past)
        h = x_BTD + self.drop(a)
        m, aux_mlp = self.mlpf(self.ln_2(h), mask_BT)
        out = h + self.drop(m)
        return out, {k: aux_att[k] + aux_mlp[k] for k in AUX_KEYS}, present


class MoLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        # Training with grad: recompute each block in the backward (the trainer sets it from the job's
        # training.activation_checkpointing); the monitor's forward hooks ignore the recomputation.
        self.activation_checkpointing = False
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Released ModuleFormer init: every nn.Linear and the embedding N(0, init_std) with zero bias,
        LayerNorm (1, 0), expert weights U(-1/fan_in, 1/fan_in); routers per `config.router_init`
        (default fan_in: N(0, 1/fan_in) for B and A; "released": N(0, init_std) like any nn.Linear)."""
        std = self.config.init_std
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for layer in self.moe_layers():
            layer.router.reset_parameters(std, self.config.router_init)
            layer.experts.reset_parameters()

    def moe_sublayers(self) -> list[MoESubLayer]:
        """The MoE sub-layers in order: block 0 attention, block 0 MLP, block 1 attention, ... (the one
        list everything else asks: ``molm_ds.model.sublayers``)."""
        return [MoESubLayer(SubLayer(i, kind), f"blocks.{i}.{attr}", getattr(b, attr))
                for i, b in enumerate(self.blocks) for kind, attr in ((ATTN, "attn"), (MLP, "mlpf"))]

    def moe_layers(self) -> Iterator[nn.Module]:
        """The modules of ``moe_sublayers()``, in the same order."""
        for s in self.moe_sublayers():
            yield s.module

    def forward(
        self,
        input_ids_BT: Tensor,
        attention_mask: Optional[Tensor] = None,
        past_key_values: Optional[list] = None,
        use_cache: bool = False,
    ) -> MoLMOutput:
        """attention_mask: [B, S] (1 = real token, 0 = padding; left or right padding) covering the
        cached tokens and the new ones, or [B, T] when there is no cache. Padded tokens are routed to no
        expert and excluded from the aux losses; their logits are meaningless."""
        B, T = input_ids_BT.shape
        past_len = 0 if past_key_values is None else past_key_values[0][0].shape[1]
        if past_key_values is not None and len(past_key_values) != len(self.blocks):
            raise ValueError(f"past_key_values has {len(past_key_values)} layers, the model {len(self.blocks)}")
        mask_BT = key_mask_BS = None
        if attention_mask is not None:
            if attention_mask.shape != (B, past_len + T):
                raise ValueError(
                    f"attention_mask must be [B, past + T] = [{B}, {past_len + T}] (cached plus new tokens); "
                    f"got {tuple(attention_mask.shape)}"
                )
            key_mask_BS = attention_mask.bool()
            mask_BT = key_mask_BS[:, past_len:]
        x = self.drop(self.wte(input_ids_BT))
        aux = {k: x.new_zeros((), dtype=torch.float32) for k in AUX_KEYS}
        presents = [] if use_cache else None
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            past = None if past_key_values is None else past_key_values[i]
            if recompute:
                x, aux_i, present = checkpoint(block, x, mask_BT, key_mask_BS, past, use_reentrant=False)
            else:
                x, aux_i, present = block(x, mask_BT, key_mask_BS, past)
            aux = {k: aux[k] + aux_i[k] for k in AUX_KEYS}
            if use_cache:
                presents.append(present)
        logits = self.lm_head(self.ln_f(x))
        return MoLMOutput(logits, aux, presents)

    @torch.no_grad()
    def generate(self, input_ids_BT: Tensor, max_new_tokens: int, **kwargs) -> Tensor:
        """See `molm_ds.model.generate.generate`."""
        from molm_ds.model.generate import generate

        return generate(self, input_ids_BT, max_new_tokens, **kwargs)
