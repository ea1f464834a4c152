"""Expert-load statistics of one MoE sub-layer, from its routing decisions.

Legend: T tokens, K slots per token, E experts (global).

Statistics are computed in two stages so that a distributed run gives exactly what one process would
count on the whole batch: `LoadSums` holds *additive* raw sums (slot counts per expert, summed router
probabilities, summed per-token entropies, token and dropped-slot counts); sums from several
micro-batches or ranks are added (all-reduce SUM) and only then turned into statistics by
`load_stats`. Nothing here touches torch.distributed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

__all__ = ["LoadSums", "load_stats", "STAT_NAMES", "ROUTER_STAT_NAMES", "RouterUnitSums", "router_unit_stats",
           "relative_entropy"]

# Scalar statistics per sub-layer, in the order `load_stats` returns them (tags use these names).
STAT_NAMES = (
    "max_over_mean_load",  # max_e n_e / mean_e n_e (1 = balanced, E = collapsed onto one expert)
    "min_over_mean_load",  # min_e n_e / mean_e n_e
    "cv",  # coefficient of variation of n_e: std / mean (population std)
    "dead_experts",  # experts that received no slot in the window
    "dropped_frac",  # dropped slots / all slots of real tokens
    "H_m",  # entropy of p(m) = mean over tokens of p(m|x), nats
    "H_m_given_x",  # mean over tokens of the entropy of p(m|x), nats
    "mi",  # H(m) - H(m|x) (the MI load-balance loss is its negative)
)


@dataclass
class LoadSums:
    """Additive routing sums of one MoE sub-layer over a window of tokens.

    counts_E: routed (not dropped) slots per expert; probs_E: sum over tokens of p(m|x);
    ent: sum over tokens of H(p(.|x)); tokens: real tokens seen; slots: tokens * K; dropped: slots with
    idx -1. All float64 so that sums stay exact (integers up to 2**53) and reduce in one tensor.
    """

    counts_E: Tensor
    probs_E: Tensor
    ent: Tensor
    tokens: Tensor
    slots: Tensor
    dropped: Tensor

    @property
    def num_experts(self) -> int:
        return self.counts_E.numel()

    @classmethod
    def zeros(cls, num_experts: int, device=None) -> "LoadSums":
        z = lambda n: torch.zeros(n, dtype=torch.float64, device=device)  # noqa: E731
        return cls(z(num_experts), z(num_experts), z(()), z(()), z(()), z(()))

    @classmethod
    def from_routing(
        cls, *, probs_TE: Tensor, idx_TK: Tensor, num_experts: int, mask_T: Optional[Tensor] = None
    ) -> "LoadSums":
        """Sums of one forward: probs_TE [T, E] full softmax, idx_TK [T, K] int (-1 = dropped slot),
        mask_T [T] bool (True = real token) or None (all real). Leading batch dims are flattened."""
        E = num_experts
        if probs_TE.shape[-1] != E:
            raise ValueError(f"probs_TE has {probs_TE.shape[-1]} experts in its last dim but num_experts={E}")
        probs_TE = probs_TE.reshape(-1, E)
        idx_TK = idx_TK.reshape(probs_TE.shape[0], -1)
        T, K = idx_TK.shape
        f64 = torch.float64
        if mask_T is not None:
            mask_T = mask_T.reshape(-1).bool()
            if mask_T.numel() != T:
                raise ValueError(f"mask_T has {mask_T.numel()} tokens, probs_TE has {T}")
        # This runs after every training forward, so it only queues device work: masks are weights and
        # counts are an index_add (no boolean indexing or bincount, whose output sizes depend on the data).
        # The id range check reads the ids, so it runs only where that is no device sync (CPU).
        # (Not while torch.compile traces: a value read would break the graph.)
        if (idx_TK.device.type == "cpu" and not torch.compiler.is_compiling() and idx_TK.numel()
                and (int(idx_TK.max()) >= E or int(idx_TK.min()) < -1)):
            raise ValueError(f"idx_TK holds ids outside [-1, {E}): got [{int(idx_TK.min())}, {int(idx_TK.max())}]")
        real_T = torch.ones(T, dtype=torch.bool, device=idx_TK.device) if mask_T is None else mask_T
        routed_TK = (idx_TK >= 0) & real_T[:, None]
        w_T = real_T.to(f64)
        p_TE = probs_TE.to(f64)
        tokens = w_T.sum()
        return cls(
            counts_E=torch.zeros(E, dtype=f64, device=idx_TK.device).index_add_(
                0, idx_TK.clamp_min(0).reshape(-1), routed_TK.reshape(-1).to(f64)),
            probs_E=(p_TE * w_T[:, None]).sum(0),
            ent=(torch.special.entr(p_TE).sum(-1) * w_T).sum(),
            tokens=tokens,
            slots=tokens * K,
            dropped=((idx_TK < 0) & real_T[:, None]).sum().to(f64),
        )

    def __add__(self, other: "LoadSums") -> "LoadSums":
        if other.num_experts != self.num_experts:
            raise ValueError(f"cannot add sums over {self.num_experts} and {other.num_experts} experts")
        return LoadSums(*(a + b.to(a.device) for a, b in zip(self.as_tuple(), other.as_tuple())))

    def as_tuple(self) -> tuple[Tensor, ...]:
        return (self.counts_E, self.probs_E, self.ent, self.tokens, self.slots, self.dropped)

    def flatten(self) -> Tensor:
        """One float64 vector [2E + 4] (for a single all-reduce)."""
        return torch.cat([t.reshape(-1) for t in self.as_tuple()])

    @classmethod
    def unflatten(cls, flat: Tensor, num_experts: int) -> "LoadSums":
        E = num_experts
        if flat.numel() != 2 * E + 4:
            raise ValueError(f"expected {2 * E + 4} values for {E} experts, got {flat.numel()}")
        return cls(flat[:E], flat[E : 2 * E], flat[2 * E], flat[2 * E + 1], flat[2 * E + 2], flat[2 * E + 3])

    def shares(self) -> Tensor:
        """Token share of every expert [E]: n_e / sum n (sums to 1 over the routed slots; zeros when none)."""
        total = self.counts_E.sum()
        return self.counts_E / total if total > 0 else torch.zeros_like(self.counts_E)


def _entropy(p_E: Tensor) -> float:
    return float(torch.special.entr(p_E).sum())


def load_stats(sums: LoadSums) -> dict[str, float]:
    """Statistics named in STAT_NAMES from (already reduced) sums. NaN where undefined (no tokens)."""
    n_E = sums.counts_E.double().cpu()
    E = n_E.numel()
    mean = float(n_E.mean())
    tokens, slots = float(sums.tokens), float(sums.slots)
    nan = math.nan
    out = {
        "max_over_mean_load": float(n_E.max()) / mean if mean > 0 else nan,
        "min_over_mean_load": float(n_E.min()) / mean if mean > 0 else nan,
        "cv": float(n_E.std(unbiased=False)) / mean if mean > 0 and E > 1 else (0.0 if mean > 0 else nan),
        "dead_experts": float((n_E == 0).sum()),
        "dropped_frac": float(sums.dropped) / slots if slots > 0 else nan,
    }
    if tokens > 0:
        h_m = _entropy(sums.probs_E.double().cpu() / tokens)
        h_mx = float(sums.ent) / tokens
        out.update(H_m=h_m, H_m_given_x=h_mx, mi=h_m - h_mx)
    else:
        out.update(H_m=nan, H_m_given_x=nan, mi=nan)
    return out


# Router-health statistics per sub-layer (molm router only for the hidden-unit ones), in the order
# `router_unit_stats` / `router_health` return them.
ROUTER_STAT_NAMES = (
    "router_dead_units",  # fraction of router hidden units whose pre-activation was never > 0 in the window
    "router_preact_mean",  # mean pre-activation (B x + b) over tokens and units
    "router_preact_pos_frac",  # fraction of (token, unit) pre-activations > 0
    "H_m_given_x_rel",  # H(m|x) / log E (1 = uniform router; NaN for E = 1)
    "router_near_uniform",  # 1 when H(m|x) >= (1 - tol) log E; written only after the warm-up
)


@dataclass
class RouterUnitSums:
    """Additive sums over a window of one MoLM router's hidden layer (z = B x + b, R units).

    positive_R: tokens with z_r > 0 per unit; preact_sum: sum of z over tokens and units; tokens: real
    tokens. float64, so sums from micro-batches and ranks add exactly (one SUM all-reduce)."""

    positive_R: Tensor
    preact_sum: Tensor
    tokens: Tensor

    @property
    def width(self) -> int:
        return self.positive_R.numel()

    @classmethod
    def zeros(cls, width: int, device=None) -> "RouterUnitSums":
        z = lambda n: torch.zeros(n, dtype=torch.float64, device=device)  # noqa: E731
        return cls(z(width), z(()), z(()))

    @classmethod
    def from_record(cls, record) -> "RouterUnitSums":
        """From a `molm_ds.model.router.HiddenUnitRecord` (device tensors; no host sync)."""
        f64 = torch.float64
        return cls(record.positive_R.to(f64), record.preact_sum.to(f64), record.tokens.to(f64))

    def __add__(self, other: "RouterUnitSums") -> "RouterUnitSums":
        if other.width != self.width:
            raise ValueError(f"cannot add router sums over {self.width} and {other.width} hidden units")
        return RouterUnitSums(*(a + b.to(a.device) for a, b in zip(self.as_tuple(), other.as_tuple())))

    def as_tuple(self) -> tuple[Tensor, ...]:
        return (self.positive_R, self.preact_sum, self.tokens)

    def flatten(self) -> Tensor:
        """One float64 vector [R + 2]."""
        return torch.cat([t.reshape(-1) for t in self.as_tuple()])

    @classmethod
    def unflatten(cls, flat: Tensor, width: int) -> "RouterUnitSums":
        if flat.numel() != width + 2:
            raise ValueError(f"expected {width + 2} values for {width} hidden units, got {flat.numel()}")
        return cls(flat[:width], flat[width], flat[width + 1])


def router_unit_stats(sums: RouterUnitSums) -> dict[str, float]:
    """router_dead_units, router_preact_mean, router_preact_pos_frac from (reduced) sums; NaN without tokens.

    A unit is dead when its GELU pre-activation was never positive for any real token of the window
    (on any rank): it then only ever works on GELU's negative tail (gelu(z) = z Phi(z) -> 0; at z = -3 it
    passes 0.13 % of its input with slope -0.012), so it hardly moves the logits and hardly learns. The
    mean pre-activation says how deep in that tail the layer sits."""
    tokens = float(sums.tokens)
    R = sums.width
    if tokens <= 0 or R == 0:
        return {"router_dead_units": math.nan, "router_preact_mean": math.nan, "router_preact_pos_frac": math.nan}
    pos = sums.positive_R.double().cpu()
    return {
        "router_dead_units": float((pos == 0).sum()) / R,
        "router_preact_mean": float(sums.preact_sum) / (tokens * R),
        "router_preact_pos_frac": float(pos.sum()) / (tokens * R),
    }


def relative_entropy(h_m_given_x: float, num_experts: int) -> float:
    """H(m|x) / log E: 1 for a uniform router, 0 for a one-hot one; NaN when E = 1 (no choice to make)."""
    if num_experts < 2 or not math.isfinite(h_m_given_x):
        return math.nan
    return h_m_given_x / math.log(num_experts)
