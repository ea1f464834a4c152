"""Expert computations on rows grouped by expert. Experts know nothing of routing.

Legend: N rows (token-expert pairs, grouped by expert: all rows of expert 0, then expert 1, ...),
E experts (local experts under expert parallelism), D d_model, H MLP hidden, A attention width,
T tokens, K slots per token. Rows come grouped (``forward``: a dispatcher moved them, e.g. over an
all-to-all) or stay in token order (``MLPExperts.forward_tokens``: the grouped order is given as slot
ids, and the gather and the gate-weighted combine are fused into the two expert GEMMs).
Weights are stacked with the expert first ([E, in, out], the released ModuleFormer orientation), so
the grouped GEMM needs no per-step copy and expert parallelism slices dim 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from molm_ds.ops import grouped_gemm, grouped_gemm_gated
from molm_ds.ops.grouped_gemm import GroupCounts


def _init_expert_weight(w: Tensor) -> None:
    # Released ModuleFormer ParallelExperts: U(-1/fan_in, 1/fan_in).
    nn.init.uniform_(w, -1.0 / w.shape[1], 1.0 / w.shape[1])


class MLPExperts(nn.Module):
    """E MLP experts: `gelu_tanh`: y = gelu_tanh(x W1) W2 (MoLM), `swiglu`: y = (silu(x W1g) * x W1u) W2,
    with W1 = [W1g | W1u] stacked along the output dim. No biases. w1 [E, D, H'] (H' = H or 2H), w2 [E, H, D]."""

    def __init__(self, num_experts: int, d_model: int, hidden: int, activation: str = "gelu_tanh") -> None:
        super().__init__()
        if activation not in ("gelu_tanh", "swiglu"):
            raise ValueError(f"MLPExperts: activation must be 'gelu_tanh' or 'swiglu', got {activation!r}")
        self.activation = activation
        width = 2 * hidden if activation == "swiglu" else hidden
        self.w1 = nn.Parameter(torch.empty(num_experts, d_model, width))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, d_model))
        self.reset_parameters()

    @property
    def num_experts(self) -> int:
        return self.w1.shape[0]

    def reset_parameters(self) -> None:
        _init_expert_weight(self.w1)
        _init_expert_weight(self.w2)

    def act(self, h_NH: Tensor) -> Tensor:
        if self.activation == "swiglu":
            gate, up = h_NH.chunk(2, dim=-1)
            return F.silu(gate) * up
        return F.gelu(h_NH, approximate="tanh")

    def forward(self, x_ND: Tensor, counts_E: Tensor) -> Tensor:
        """Grouped rows in, grouped rows out."""
        return grouped_gemm(self.act(grouped_gemm(x_ND, self.w1, counts_E)), self.w2, counts_E)

    def forward_tokens(self, x_TD: Tensor, weights_TK: Tensor, slot_N: Tensor, counts_E) -> Tensor:
        """Token order in, y_TD = sum_k weights_TK[t, k] * f_e(x_t) out. ``slot_N`` lists the kept slots
        (t*K + k) in expert order, ``counts_E`` how many belong to each expert: the first GEMM gathers
        x rows by slot, the second scales each row by its gate and sums a token's slots (scattermoe's
        mlp.py), so no [N, D] copy of x and no separate combine pass exist."""
        h_NH = grouped_gemm(x_TD, self.w1, counts_E, src_N=slot_N, fan_in=weights_TK.shape[1])
        return grouped_gemm_gated(self.act(h_NH), self.w2, counts_E, weights_TK, slot_N)

    def forward_reference(self, x_ND: Tensor, counts_E: Tensor) -> Tensor:
        """Readable loop over experts (the slow path)."""
        out, start = [], 0
        for e, n in enumerate(GroupCounts.of(counts_E).host()):
            xe = x_ND[start : start + n]
            out.append(self.act(xe @ self.w1[e]) @ self.w2[e])
            start += n
        return torch.cat(out, 0) if out else x_ND.new_zeros(0, self.w2.shape[-1])


class AttentionExperts(nn.Module):
    """E attention experts' own projections: query w_q [E, D, A] and output w_o [E, A, D]. No biases.
    `forward_q(x_ND, counts_E) -> q_NA`, `forward_o(o_NA, counts_E) -> y_ND`; keys/values are shared by the
    layer, not part of the experts."""

    def __init__(self, num_experts: int, d_model: int, att_hidden: int) -> None:
        super().__init__()
        self.w_q = nn.Parameter(torch.empty(num_experts, d_model, att_hidden))
        self.w_o = nn.Parameter(torch.empty(num_experts, att_hidden, d_model))
        self.reset_parameters()

    @property
    def num_experts(self) -> int:
        return self.w_q.shape[0]

    def reset_parameters(self) -> None:
        _init_expert_weight(self.w_q)
        _init_expert_weight(self.w_o)

    def forward_q(self, x_ND: Tensor, counts_E: Tensor) -> Tensor:
        return grouped_gemm(x_ND, self.w_q, counts_E)

    def forward_o(self, o_NA: Tensor, counts_E: Tensor) -> Tensor:
        return grouped_gemm(o_NA, self.w_o, counts_E)

    forward = forward_q
