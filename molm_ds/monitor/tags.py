"""TensorBoard tag names (one place, so the report and the tests read what the monitor writes).

Scalars (through DeepSpeed's monitor):   train/<metric>, val/<metric>, moe/L03/mlp/<stat>
                                         (<stat>: stats.STAT_NAMES and stats.ROUTER_STAT_NAMES)
Per-expert shares (SummaryWriter):       expert_share/L03/mlp/e007       (E <= per_expert_max)
                                         expert_share/L03/mlp/top1, .../top1_id, .../bottom1, ...
Histograms:                              expert_share_hist/L03/mlp
Heatmap images:                          expert_load_heatmap/mlp
"""

from __future__ import annotations

import re

import torch

from molm_ds.monitor.expert_load import SubLayer

__all__ = ["stat_tag", "per_expert_share_scalars", "hist_tag", "heatmap_tag", "parse_share_tag"]


def stat_tag(sub: SubLayer, stat: str) -> str:
    return f"moe/{sub.tag}/{stat}"


def hist_tag(sub: SubLayer) -> str:
    return f"expert_share_hist/{sub.tag}"


def heatmap_tag(kind: str) -> str:
    return f"expert_load_heatmap/{kind}"


def per_expert_share_scalars(sub: SubLayer, shares_E: torch.Tensor, *, per_expert_max: int, top_k: int) -> dict[str, float]:
    """Share scalars for one sub-layer: every expert when E <= per_expert_max, else the top_k and
    bottom_k shares by rank with their expert ids (at most 4 * top_k tags, whatever E is)."""
    E = shares_E.numel()
    base = f"expert_share/{sub.tag}"
    if E <= per_expert_max:
        return {f"{base}/e{e:03d}": float(v) for e, v in enumerate(shares_E.tolist())}
    k = min(top_k, E)
    order = torch.argsort(shares_E, descending=True, stable=True)
    out = {}
    for i in range(k):
        hi, lo = int(order[i]), int(order[E - 1 - i])
        out[f"{base}/top{i + 1}"] = float(shares_E[hi])
        out[f"{base}/top{i + 1}_id"] = float(hi)
        out[f"{base}/bottom{i + 1}"] = float(shares_E[lo])
        out[f"{base}/bottom{i + 1}_id"] = float(lo)
    return out


_SHARE_RE = re.compile(r"^expert_share/L(\d+)/(\w+)/e(\d+)$")


def parse_share_tag(tag: str):
    """(layer, kind, expert) for a per-expert share tag, else None."""
    m = _SHARE_RE.match(tag)
    return (int(m.group(1)), m.group(2), int(m.group(3))) if m else None
