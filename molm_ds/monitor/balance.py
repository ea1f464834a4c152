"""What aux-loss-free balancing is doing, per sub-layer: the bias of every expert and the load it produced.

For each sub-layer whose router has a balancing bias (``router_balance: bias``), at a logged step:

    balance/L03/mlp/bias/e007      the bias of expert 7 (only when E <= per_expert_max: bounded tag count)
    balance/L03/mlp/bias_min, bias_max, bias_spread (max - min)
    balance/L03/mlp/load_max_mean  max/mean of the last step's expert counts (1 = perfect balance)
    balance/L03/mlp/load_cv        their coefficient of variation

The load is the one the last bias update used (``Router.last_step_load_E``: every micro-batch of the step on
every rank, already all-reduced), and the bias is identical on every rank, so nothing here reduces; the
values are read on the host (one copy per call: logging steps only). The trainer adds them to its row, so
they reach metrics.jsonl, TensorBoard (``train/balance/...``) and the report.
"""

from __future__ import annotations

import torch
from torch import nn

from molm_ds.model.sublayers import moe_sublayers

__all__ = ["balance_metrics"]


def balance_metrics(model: nn.Module, *, per_expert_max: int = 32) -> dict[str, float]:
    subs = [(s.key, s.module.router) for s in moe_sublayers(model)
            if getattr(s.module.router, "expert_bias_E", None) is not None]
    if not subs:
        return {}
    parts = []
    for _, r in subs:
        load = r.last_step_load_E
        parts += [r.expert_bias_E.double(), (load if load is not None else torch.full_like(r.expert_bias_E, float("nan"))).double()]
    flat = torch.cat([p.cpu() for p in parts]).tolist()
    out: dict[str, float] = {}
    pos = 0
    for sub, r in subs:
        E = r.num_experts
        bias, load = flat[pos:pos + E], torch.tensor(flat[pos + E:pos + 2 * E], dtype=torch.float64)
        pos += 2 * E
        base = f"balance/{sub.tag}"
        if E <= per_expert_max:
            out.update({f"{base}/bias/e{e:03d}": b for e, b in enumerate(bias)})
        out[f"{base}/bias_min"], out[f"{base}/bias_max"] = min(bias), max(bias)
        out[f"{base}/bias_spread"] = max(bias) - min(bias)
        mean = float(load.mean())
        if mean > 0:  # NaN (no update yet) and zero-token steps are left out
            out[f"{base}/load_max_mean"] = float(load.max()) / mean
            out[f"{base}/load_cv"] = float(load.std(unbiased=False)) / mean
    return out
