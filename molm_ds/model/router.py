"""Routers: which experts each token uses, and with what gate.

Legend: T tokens (flattened batch), D d_model, R router width, E experts, K experts per token.

MoLM router: `logits_TE = A . gelu(B x + b)` (exact erf GELU), `probs_TE = softmax(logits_TE)` over all
E experts, top-k; the gate of a chosen expert is its full-softmax probability (NOT renormalised over
the top-k: MoLM checkpoints depend on this). `A = w_gate` [E, R]; its rows are the module embeddings.

Options (see `ModelConfig`): renormalised top-k, a linear router (`logits = A x`, A [E, D]),
`sample_topk` (training only), expert-choice routing (training only; in eval the router falls back to
token choice, because expert choice looks at future tokens and is not causal), and a capacity
factor that drops overflow slots (idx -1, weight 0; training only: which slots overflow depends on
later tokens, so eval is dropless to stay causal and KV-cache exact). Default: dropless token choice.

Auxiliary-loss-free balancing (``balance="bias"``, DeepSeek-V3): the buffer ``expert_bias_E`` is added to
``probs_TE`` to choose the top-k; the gates are the unbiased probabilities, so no gradient reaches the bias
and it changes which experts a token uses, never how much they weigh. In training forwards (not the
activation-checkpoint recomputation) the router adds the chosen experts' counts to ``load_E`` (int64, device);
the trainer turns the counts of a whole optimizer step into one bias update and clears them (``bias_update``;
the all-reduce and the schedule live in ``molm_ds.train.balance``).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RouterOutput(NamedTuple):
    weights_TK: Tensor  # gates, 0 for dropped slots
    idx_TK: Tensor  # int64 expert ids in [0, E), -1 for a dropped slot
    probs_TE: Tensor  # full softmax (for the aux losses)
    logits_TE: Tensor  # router logits (for the z-loss)


class HiddenUnitRecord(NamedTuple):
    """The MoLM router's hidden layer in its last forward (detached, on the router's device; real tokens
    only): for monitoring GELU units that never turn on (molm_ds.monitor)."""

    positive_R: Tensor  # int64 [R]: tokens whose pre-activation (B x + b) of unit r was > 0
    preact_sum: Tensor  # float64 []: sum over tokens and units of the pre-activation
    tokens: Tensor  # int64 []: real tokens seen


class Router(nn.Module):
    """Token-choice top-k router with the MoLM options. Knows nothing of experts.

    After each forward of a `molm` router, `last_hidden` holds a `HiddenUnitRecord` of that forward
    (device tensors, no host sync); None for a linear router or before the first forward."""

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        *,
        router_type: str = "molm",
        gating_size: int = 256,
        renormalize_topk: bool = False,
        sample_topk: int = 0,
        routing: str = "token_choice",
        capacity_factor: Optional[float] = None,
        balance: str = "none",
        bias_rate: float = 1e-3,
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"Router: top_k={top_k} must be in [1, num_experts={num_experts}]")
        if sample_topk > top_k:
            raise ValueError(f"Router: sample_topk={sample_topk} must be <= top_k={top_k}")
        if router_type not in ("molm", "linear"):
            raise ValueError(f"Router: router_type must be 'molm' or 'linear', got {router_type!r}")
        if routing not in ("token_choice", "expert_choice"):
            raise ValueError(f"Router: routing must be 'token_choice' or 'expert_choice', got {routing!r}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.router_type = router_type
        self.renormalize_topk = renormalize_topk
        self.sample_topk = sample_topk
        self.routing = routing
        self.capacity_factor = capacity_factor
        if balance not in ("none", "bias"):
            raise ValueError(f"Router: balance must be 'none' or 'bias', got {balance!r}")
        if balance == "bias" and (routing != "token_choice" or sample_topk):
            raise ValueError("Router: balance='bias' needs token_choice routing without sample_topk")
        self.bias_rate = bias_rate
        if balance == "bias":  # fp32 state; a bf16 engine casts buffers, molm_ds.train.balance casts it back
            self.register_buffer("expert_bias_E", torch.zeros(num_experts, dtype=torch.float32))
        else:
            self.expert_bias_E = None
        self.load_E: Optional[Tensor] = None  # counts since the last bias update (not state: zero after a step)
        self.last_step_load_E: Optional[Tensor] = None  # the counts the last update used (all micro-batches, ranks)
        self.last_hidden: Optional[HiddenUnitRecord] = None
        self._preact_TR: Optional[Tensor] = None  # set by logits() only while forward() runs
        self._in_forward = False
        if router_type == "molm":
            self.proj = nn.Linear(d_model, gating_size)  # B, b
            self.w_gate = nn.Parameter(torch.empty(num_experts, gating_size))  # A
        else:
            self.proj = None
            self.w_gate = nn.Parameter(torch.empty(num_experts, d_model))  # A
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02, scheme: str = "fan_in") -> None:
        """scheme "fan_in": B ~ N(0, 1/D), A ~ N(0, 1/R) (A ~ N(0, 1/D) for a linear router), b = 0, so the
        logits are O(1) at every width and the router starts off the uniform point (docs/router_learning.md).
        scheme "released": every weight N(0, std), b = 0, as the released code initialises any nn.Linear."""
        if scheme not in ("fan_in", "released"):
            raise ValueError(f"Router: init scheme must be 'fan_in' or 'released', got {scheme!r}")
        if self.proj is not None:
            nn.init.normal_(self.proj.weight, std=std if scheme == "released" else self.proj.in_features ** -0.5)
            nn.init.zeros_(self.proj.bias)
        nn.init.normal_(self.w_gate, std=std if scheme == "released" else self.w_gate.shape[1] ** -0.5)
        if self.expert_bias_E is not None:
            nn.init.zeros_(self.expert_bias_E)
        self.load_E = None

    def extra_repr(self) -> str:
        return (f"E={self.num_experts}, k={self.top_k}, type={self.router_type}, routing={self.routing}, "
                f"renormalize={self.renormalize_topk}, sample_topk={self.sample_topk}, capacity={self.capacity_factor}, "
                f"balance={'none' if self.expert_bias_E is None else 'bias'}")

    def may_drop(self, mask_T: Optional[Tensor]) -> bool:
        """Whether this forward can leave slots empty (idx -1): padded tokens, capacity overflow or
        expert choice. A dispatcher that is told it cannot needs no host sync to count the kept slots."""
        return mask_T is not None or (self.training and (self.capacity_factor is not None
                                                         or self.routing == "expert_choice"))

    def _capacity(self, T: int, mask_T: Optional[Tensor]):
        """ceil(factor * real tokens * k / E), at least 1; a device tensor when a mask counts the real
        tokens (no host sync)."""
        if mask_T is None:
            return max(1, math.ceil(self.capacity_factor * T * self.top_k / self.num_experts))
        n_real = mask_T.sum().double()
        return torch.ceil(self.capacity_factor * n_real * self.top_k / self.num_experts).clamp_min(1)

    def logits(self, x_TD: Tensor) -> Tensor:
        if self.proj is None:
            return x_TD @ self.w_gate.t()
        z_TR = self.proj(x_TD)
        if self._in_forward:
            self._preact_TR = z_TR.detach()  # forward() turns it into last_hidden (it knows the mask)
        return F.gelu(z_TR) @ self.w_gate.t()

    def _record_hidden(self, z_TR: Tensor, mask_T: Optional[Tensor]) -> None:
        pos = z_TR > 0
        if mask_T is not None:
            pos = pos & mask_T[:, None]
            z_TR = z_TR * mask_T[:, None].to(z_TR.dtype)
        # torch.full, not torch.tensor: copying a Python int to the device would wait for the stream
        tokens = (torch.full((), z_TR.shape[0], dtype=torch.int64, device=z_TR.device) if mask_T is None
                  else mask_T.sum())
        self.last_hidden = HiddenUnitRecord(pos.sum(0), z_TR.sum(dtype=torch.float64), tokens)

    def forward(self, x_TD: Tensor, mask_T: Optional[Tensor] = None) -> RouterOutput:
        """Route T tokens. `mask_T` (bool, True = real token): padded tokens get idx -1 and weight 0."""
        self._in_forward, self._preact_TR = True, None
        logits_TE = self.logits(x_TD)  # through the method, so that it can be wrapped (tests/test_prune.py)
        self._in_forward = False
        if self._preact_TR is not None:
            self._record_hidden(self._preact_TR, mask_T)
            self._preact_TR = None
        probs_TE = torch.softmax(logits_TE.float(), dim=-1)  # fp32 under bf16 too: gates, top-k, aux losses
        if self.training and self.routing == "expert_choice":
            weights_TK, idx_TK = expert_choice(probs_TE, self.top_k, self.capacity_factor or 1.0, mask_T)
        else:
            if self.training and self.sample_topk > 0:
                idx_TK = sampled_topk(probs_TE, self.top_k, self.sample_topk)
            else:
                idx_TK = self.selection_scores(probs_TE).topk(self.top_k, dim=-1).indices
            weights_TK = probs_TE.gather(1, idx_TK)
            if mask_T is not None:
                idx_TK = idx_TK.masked_fill(~mask_T[:, None], -1)
            # compiled (training.compile): traced into the forward graph, which a recomputation does not rerun
            if self.expert_bias_E is not None and self.training and (torch.compiler.is_compiling() or not _in_backward()):
                counts_E = expert_counts(idx_TK, self.num_experts)  # chosen experts, before capacity drops
                self.load_E = counts_E if self.load_E is None else self.load_E + counts_E
            if self.capacity_factor is not None and self.training:
                idx_TK = drop_over_capacity(idx_TK, self.num_experts, self._capacity(x_TD.shape[0], mask_T))
            weights_TK = weights_TK.masked_fill(idx_TK < 0, 0.0)
        if self.renormalize_topk:
            weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True).clamp_min(1e-9)
        return RouterOutput(weights_TK, idx_TK, probs_TE, logits_TE)

    def selection_scores(self, probs_TE: Tensor) -> Tensor:
        """What the top-k ranks: the probabilities, plus the balancing bias when there is one (detached: the
        bias steers the choice only)."""
        if self.expert_bias_E is None:
            return probs_TE
        return probs_TE.detach() + self.expert_bias_E.float()


def _in_backward() -> bool:
    """True while autograd runs backward (an activation-checkpoint recomputation must not count twice)."""
    fn = getattr(torch._C, "_current_graph_task_id", None)
    return fn is not None and fn() != -1


def expert_counts(idx_TK: Tensor, num_experts: int) -> Tensor:
    """int64 [E]: slots routed to each expert (-1 slots count nowhere). A comparison and a sum: no
    bincount, no scatter, so it is deterministic and needs no host sync."""
    ids_E = torch.arange(num_experts, device=idx_TK.device)
    return (idx_TK.reshape(-1, 1) == ids_E).sum(0)


def bias_update(*, bias_E: Tensor, load_E: Tensor, rate: float) -> Tensor:
    """DeepSeek-V3's rule: ``b_m + rate * sign(mean_m' load - load_m)``. An overloaded expert's bias falls,
    an underloaded one's rises, one at exactly the mean stays. ``load_E``: counts of the whole step."""
    load = load_E.double()
    return (bias_E.double() + rate * torch.sign(load.mean() - load)).to(bias_E.dtype)


def sampled_topk(probs_TE: Tensor, k: int, n_sample: int) -> Tensor:
    """Keep the top (k - n_sample) experts; sample the other n_sample without replacement from the
    softmax over the remaining experts (Gumbel top-n). Returns idx_TK."""
    with torch.no_grad():
        fixed = probs_TE.topk(k - n_sample, dim=-1).indices
        gumbel = -torch.log(-torch.log(torch.rand_like(probs_TE, dtype=torch.float32).clamp(1e-20, 1.0)))
        scores = torch.log(probs_TE.float() + 1e-9) + gumbel
        scores = scores.scatter(1, fixed, float("-inf"))
        sampled = scores.topk(n_sample, dim=-1).indices
        return torch.cat([fixed, sampled], dim=-1)


def drop_over_capacity(idx_TK: Tensor, num_experts: int, capacity) -> Tensor:
    """Drop (set to -1) the slots that overflow an expert's capacity. Priority: first choices of all
    tokens before second choices, and earlier tokens first within a choice rank. ``capacity``: an int
    or a 0-d tensor."""
    T, K = idx_TK.shape
    flat = idx_TK.t().reshape(-1)  # slot-major order [K*T]
    onehot = F.one_hot(flat.clamp_min(0), num_experts) * (flat >= 0)[:, None]
    position = (onehot.cumsum(0) * onehot).sum(-1) - 1  # 0-based arrival rank at its expert
    keep = (flat >= 0) & (position < capacity)
    return flat.masked_fill(~keep, -1).reshape(K, T).t().contiguous()


def expert_choice(probs_TE: Tensor, k: int, capacity_factor: float, mask_T: Optional[Tensor]):
    """Expert-choice routing (training only): each expert takes its top-c tokens,
    c = ceil(capacity_factor * T * k / E). Returns (weights_TK', idx_TK') where K' is the largest
    number of experts any token got (>= 1), chosen experts first in each row, -1 padding."""
    T, E = probs_TE.shape
    scores = probs_TE if mask_T is None else probs_TE.masked_fill(~mask_T[:, None], -1.0)
    n_real = T if mask_T is None else int(mask_T.sum())
    c = min(T, max(1, math.ceil(capacity_factor * n_real * k / E)))
    tok_CE = scores.detach().topk(c, dim=0).indices  # [c, E]
    chosen_TE = torch.zeros(T, E, dtype=torch.bool, device=probs_TE.device)
    chosen_TE[tok_CE, torch.arange(E, device=probs_TE.device)[None, :].expand_as(tok_CE)] = True
    if mask_T is not None:
        chosen_TE &= mask_T[:, None]
    k_eff = max(1, int(chosen_TE.sum(-1).max()))
    expert_ids = torch.arange(E, device=probs_TE.device).expand(T, E)
    order = torch.argsort((~chosen_TE).to(torch.int8), dim=-1, stable=True)[:, :k_eff]
    idx_TK = torch.where(chosen_TE.gather(1, order), expert_ids.gather(1, order), -1)
    weights_TK = probs_TE.gather(1, idx_TK.clamp_min(0)).masked_fill(idx_TK < 0, 0.0)
    return weights_TK, idx_TK
