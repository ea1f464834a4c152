"""MoLM (ModuleFormer, arXiv 2306.04640) for Hugging Face transformers, as exported by molm-ds.

Copied into every exported directory (``AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)``); it needs torch and transformers (4.46 and 5.x), nothing from molm-ds.
This is an inference implementation: plain token-choice top-k routing, dropless, readable loops.
Train with molm-ds.

Legend: B batch, T new tokens, S = cached + new keys, D n_embd, E experts, K experts per token,
A att_hidden, h heads per expert, d = A / h, X key/value width (D without K/V projections, else A),
N routed (token, expert) rows.

    h   = x + MoA(LN1(x))          mixture of stick-breaking attention experts, shared keys/values
    out = h + MoE_MLP(LN2(h))      mixture of MLP experts
    logits = lm_head(ln_f(out))    untied; no position embedding (order comes from stick-breaking)

Router: p(m|x) = softmax(A gelu(B x + b)) over the layer's experts; the gate of a chosen expert is its
full-softmax probability (renormalised over the top-k only if ``renormalize_topk``). With
``router_balance: "bias"`` each gate holds ``expert_bias`` [E] (fp32, learned by molm-ds's aux-loss-free
balancing), added to p(m|x) to choose the top-k only; the gates stay the unbiased probabilities.
Stick-breaking: z_ij = q_i . k_j / sqrt(d), A_ij = sigmoid(z_ij) prod_{j<l<=i} (1 - sigmoid(z_il)),
computed in log space; keys j <= i and the leftover mass dropped (MoLM), or keys j < i with the
leftover going to the current token's value (``stickbreaking_include_current=False``).
Parameter names follow the released ModuleFormer layout (``transformer.h.{i}.attn.q_proj.experts.weight``
[E, D, A], ...), so the weights file is the same for both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_molm import MoLMConfig, MoLMModuleFormerConfig


# transformers 5.x renamed the cache argument and output field "past_key_values" to "cache"
CACHE_FIELD = "cache" if "cache" in {f.name for f in fields(CausalLMOutputWithPast)} else "past_key_values"


class ExpertWeights(nn.Module):
    """Stacked weights of E experts, [E, in, out]; ``forward`` multiplies rows grouped by expert."""

    def __init__(self, num_experts: int, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, d_in, d_out))

    def forward(self, x_NI: Tensor, counts_E: list[int]) -> Tensor:
        out, start = [], 0
        for e, n in enumerate(counts_E):
            if n:
                out.append(x_NI[start:start + n] @ self.weight[e])
            start += n
        return torch.cat(out, 0) if out else x_NI.new_zeros(0, self.weight.shape[-1])


@dataclass
class Routing:
    gates_TK: Tensor
    order_N: Tensor  # slot (t * K + k) of each routed row, rows sorted by expert
    counts_E: list[int]

    @property
    def token_N(self) -> Tensor:
        return self.order_N // self.gates_TK.shape[1]


class MixtureOfExperts(nn.Module):
    """Router (``gate``) plus the two stacked projections of E experts (``experts``: D -> H,
    ``output_experts``: H -> D). Knows nothing of what runs between the two projections."""

    def __init__(self, config: MoLMConfig, num_experts: int, top_k: int, hidden: int, hidden_in: Optional[int] = None) -> None:
        super().__init__()
        D, R = config.n_embd, config.gating_size
        self.top_k = min(top_k, num_experts)
        self.renormalize = config.renormalize_topk
        if config.gate_type == "mlp":
            gate = [nn.Linear(D, R), nn.GELU(), nn.Identity(), nn.Linear(R, num_experts, bias=False)]
        elif config.gate_type == "linear":
            gate = [nn.Linear(D, num_experts, bias=False)]
        else:
            raise ValueError(f"gate_type {config.gate_type!r} is not supported (mlp or linear)")
        for m in gate:
            if isinstance(m, nn.Linear):
                m._molm_router = True  # _init_weights: router_init applies to these
        self.gate = nn.Module()
        self.gate.w_gate = nn.Sequential(*gate)
        if getattr(config, "router_balance", "none") == "bias":
            self.gate.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32))
        else:
            self.gate.expert_bias = None
        self.experts = ExpertWeights(num_experts, D, hidden_in or hidden)
        self.output_experts = ExpertWeights(num_experts, hidden, D)

    def route(self, x_TD: Tensor) -> Routing:
        logits_TE = self.gate.w_gate(x_TD)
        probs_TE = torch.softmax(logits_TE.float(), dim=-1).to(logits_TE.dtype)
        if self.gate.expert_bias is None:
            gates_TK, idx_TK = probs_TE.topk(self.top_k, dim=-1)
        else:  # the bias chooses, the probabilities weigh
            idx_TK = (probs_TE.float() + self.gate.expert_bias.float()).topk(self.top_k, dim=-1).indices
            gates_TK = probs_TE.gather(1, idx_TK)
        if self.renormalize:
            gates_TK = gates_TK / gates_TK.sum(-1, keepdim=True).clamp_min(1e-9)
        flat = idx_TK.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.experts.weight.shape[0]).tolist()
        return Routing(gates_TK, order, counts)

    def project_in(self, x_TD: Tensor, r: Routing) -> Tensor:
        """Each (token, chosen expert) through that expert's first projection: [T, K, H_in]."""
        T, K = r.gates_TK.shape
        y_N = self.experts(x_TD[r.token_N], r.counts_E)
        out = y_N.new_zeros(T * K, y_N.shape[-1])
        out[r.order_N] = y_N
        return out.view(T, K, -1)

    def project_out(self, h_TKH: Tensor, r: Routing) -> Tensor:
        """Each slot through its expert's second projection, summed with the gates: [T, D]."""
        T, K = r.gates_TK.shape
        y_N = self.output_experts(h_TKH.reshape(T * K, -1)[r.order_N], r.counts_E)
        out = y_N.new_zeros(T * K, y_N.shape[-1])
        out[r.order_N] = y_N
        return (out.view(T, K, -1) * r.gates_TK[..., None]).sum(1)


def _activation(name: str):
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return lambda h: F.gelu(h, approximate="tanh")
    if name == "swiglu":
        def swiglu(h):
            gate, up = h.chunk(2, dim=-1)
            return F.silu(gate) * up
        return swiglu
    raise ValueError(f"activation_function {name!r} is not supported (gelu_new or swiglu)")


class MoEMLP(MixtureOfExperts):
    def __init__(self, config: MoLMConfig, layer: int) -> None:
        E, H = config.mlp_experts_at(layer), config.ffd_hidden
        super().__init__(config, E, config.k_mlp, H, 2 * H if config.activation_function == "swiglu" else H)
        self.act = _activation(config.activation_function)

    def forward(self, x_BTD: Tensor) -> Tensor:
        B, T, D = x_BTD.shape
        x_TD = x_BTD.reshape(B * T, D)
        r = self.route(x_TD)
        return self.project_out(self.act(self.project_in(x_TD, r)), r).view(B, T, D)


def stickbreaking(q_BKhTd: Tensor, k_BhSd: Tensor, v_BhSd: Tensor, key_mask_BS: Optional[Tensor],
                  include_current: bool) -> Tensor:
    """Stick-breaking attention of T new queries (absolute positions S-T..S-1) over S keys, in fp32 log
    space: log A_ij = z_ij - softplus(z_ij) - sum_{j<l<=i} softplus(z_il). Returns [B, K, h, T, d]."""
    T, S, d = q_BKhTd.shape[3], k_BhSd.shape[2], q_BKhTd.shape[-1]
    k, v = k_BhSd.float()[:, None], v_BhSd.float()[:, None]  # broadcast over the K slots
    z = torch.matmul(q_BKhTd.float(), k.transpose(-1, -2)) / math.sqrt(d)  # [B, K, h, T, S]
    q_pos = torch.arange(S - T, S, device=z.device)[:, None]
    k_pos = torch.arange(S, device=z.device)[None, :]
    allowed = (k_pos <= q_pos) if include_current else (k_pos < q_pos)
    if key_mask_BS is not None:
        allowed = allowed & key_mask_BS.bool()[:, None, None, None, :]
    z = z.masked_fill(~allowed, float("-inf"))
    sp = F.softplus(z)  # 0 on masked keys: they break nothing
    after = torch.flip(torch.cumsum(torch.flip(sp, [-1]), -1), [-1]) - sp  # sum over l > j (l <= i)
    a = torch.exp(z - sp - after)
    o = torch.matmul(a, v)
    if not include_current:
        o = o + (1.0 - a.sum(-1, keepdim=True)).clamp_min(0.0) * v[..., S - T:, :]
    return o.to(q_BKhTd.dtype)


class MixtureOfAttention(nn.Module):
    """Attention experts own a query and an output projection (``q_proj.experts`` / ``q_proj.output_experts``);
    keys and values are shared by the layer: K = V = x without projections, else ``k_proj`` / ``v_proj``."""

    def __init__(self, config: MoLMConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_head, self.att_hidden = config.n_head, config.att_hidden
        self.include_current = config.stickbreaking_include_current
        self.q_proj = MixtureOfExperts(config, config.att_experts_at(layer), config.k_att, config.att_hidden)
        if config.kv_proj:
            self.k_proj = nn.Linear(config.n_embd, config.att_hidden)
            self.v_proj = nn.Linear(config.n_embd, config.att_hidden)
        else:
            self.k_proj = self.v_proj = None

    def forward(self, x_BTD: Tensor, key_mask_BS: Optional[Tensor], cache: Optional[Cache]) -> Tensor:
        B, T, D = x_BTD.shape
        h, d = self.n_head, self.att_hidden // self.n_head
        k_BTX = x_BTD if self.k_proj is None else self.k_proj(x_BTD)
        v_BTX = x_BTD if self.v_proj is None else self.v_proj(x_BTD)
        if cache is not None:  # stored as [B, 1, S, X]: the cache concatenates on dim -2
            k_BSX, v_BSX = cache.update(k_BTX[:, None], v_BTX[:, None], self.layer)
            k_BTX, v_BTX = k_BSX[:, 0], v_BSX[:, 0]
        S = k_BTX.shape[1]
        x_TD = x_BTD.reshape(B * T, D)
        r = self.q_proj.route(x_TD)
        K = r.gates_TK.shape[1]
        q = self.q_proj.project_in(x_TD, r).view(B, T, K, h, d).permute(0, 2, 3, 1, 4)  # [B, K, h, T, d]
        k = k_BTX.reshape(B, S, h, d).transpose(1, 2)
        v = v_BTX.reshape(B, S, h, d).transpose(1, 2)
        o = stickbreaking(q, k, v, key_mask_BS, self.include_current)
        o_TKA = o.permute(0, 3, 1, 2, 4).reshape(B * T, K, h * d)
        return self.q_proj.project_out(o_TKA, r).view(B, T, D)


class MoLMBlock(nn.Module):
    def __init__(self, config: MoLMConfig, layer: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = MixtureOfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlpf = MoEMLP(config, layer)

    def forward(self, x_BTD: Tensor, key_mask_BS: Optional[Tensor], cache: Optional[Cache]) -> Tensor:
        h = x_BTD + self.attn(self.ln_1(x_BTD), key_mask_BS, cache)
        return h + self.mlpf(self.ln_2(h))


class MoLMPreTrainedModel(PreTrainedModel):
    config_class = MoLMConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["MoLMBlock"]
    supports_gradient_checkpointing = False
    _supports_cache_class = True  # transformers 4.4x: generate() passes a DynamicCache

    def _init_weights(self, module: nn.Module) -> None:
        # As molm-ds initialises a fresh model: normal linears and embedding, experts U(-1/fan_in, 1/fan_in),
        # routers per config.router_init (the molm-ds model's choice, written by the export).
        std = self.config.initializer_range
        if isinstance(module, nn.Linear) and getattr(module, "_molm_router", False) and \
                getattr(self.config, "router_init", "released") == "fan_in":
            # molm_ds.model.router.Router's fan_in init: B ~ N(0, 1/D), A ~ N(0, 1/R), b = 0
            nn.init.normal_(module.weight, std=module.in_features ** -0.5)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, ExpertWeights):
            nn.init.uniform_(module.weight, -1.0 / module.weight.shape[1], 1.0 / module.weight.shape[1])


class MoLMModel(MoLMPreTrainedModel):
    def __init__(self, config: MoLMConfig) -> None:
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.h = nn.ModuleList([MoLMBlock(config, i) for i in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.wte = value

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, cache: Optional[Cache] = None) -> Tensor:
        """attention_mask: [B, cached + T] (1 = real token; left or right padding)."""
        x = self.wte(input_ids)
        for block in self.h:
            x = block(x, attention_mask, cache)
        return self.ln_f(x)


def _cache_length(cache: Optional[Cache]) -> int:
    return 0 if cache is None else int(cache.get_seq_length())


class MoLMForCausalLM(MoLMPreTrainedModel, GenerationMixin):
    def __init__(self, config: MoLMConfig) -> None:
        super().__init__(config)
        self.transformer = MoLMModel(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.transformer.wte = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Optional[Tensor] = None,
        past_key_values: Optional[Cache] = None,
        labels: Optional[Tensor] = None,
        use_cache: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        cache: Optional[Cache] = None,
        **kwargs,
    ):
        """``past_key_values`` (transformers 4.x) or ``cache`` (5.x): a ``Cache`` holding the shared keys
        and values of the earlier tokens; updated in place. ``labels``: the next-token loss is taken on
        ``labels[:, 1:]`` against ``logits[:, :-1]`` (-100 ignored), as for every causal LM."""
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache()
        if not use_cache:
            cache = None
        if attention_mask is not None:
            want = _cache_length(cache) + input_ids.shape[1]
            if attention_mask.shape[1] != want:
                raise ValueError(f"attention_mask covers {attention_mask.shape[1]} tokens; it must cover the cached "
                                 f"and the new ones ({want})")
            if bool(attention_mask.all()):
                attention_mask = None
        logits = self.lm_head(self.transformer(input_ids, attention_mask, cache))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].reshape(-1).to(logits.device), ignore_index=-100)
        out = CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache})
        return out if return_dict is not False else out.to_tuple()

    def prepare_inputs_for_generation(self, input_ids: Tensor, past_key_values: Optional[Cache] = None,
                                      attention_mask: Optional[Tensor] = None, use_cache: bool = True,
                                      cache: Optional[Cache] = None, **kwargs) -> dict:
        # Only the tokens the cache has not seen; the mask keeps covering all of them.
        cache = cache if cache is not None else past_key_values
        seen = _cache_length(cache)
        if seen:
            input_ids = input_ids[:, seen:]
        return {"input_ids": input_ids, CACHE_FIELD: cache, "attention_mask": attention_mask, "use_cache": use_cache}

    def _reorder_cache(self, past_key_values: Cache, beam_idx: Tensor) -> Cache:
        past_key_values.reorder_cache(beam_idx)
        return past_key_values


class MoLMModuleFormerForCausalLM(MoLMForCausalLM):
    """The same model for configurations under the released ``model_type`` ("moduleformer")."""

    config_class = MoLMModuleFormerConfig
