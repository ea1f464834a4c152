"""Rank workers for test_ep_dispatch.py (importable by spawned processes)."""

from __future__ import annotations

import torch

from molm_ds.model.dispatch import LocalDispatcher, combine_reference
from molm_ds.model.experts import MLPExperts


def make_case(name: str, world: int, E: int, K: int, D: int):
    """Per-rank (x, idx) for every rank, identical on all ranks (seeded)."""
    g = torch.Generator().manual_seed(1234)
    El = E // world
    Ts = {"random": [7, 5, 9, 4], "nothing_to_rank1": [6, 4, 5, 3], "rank0_sends_none": [5, 6, 4, 7],
          "rank0_empty_batch": [0, 6, 4, 5]}[name][:world]
    cases = []
    for r, T in enumerate(Ts):
        idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]) if T else torch.zeros(0, K, dtype=torch.long)
        if name == "random":
            drop = torch.rand(T, K, generator=g) < 0.2
            idx = torch.where(drop, torch.full_like(idx, -1), idx)
        elif name == "nothing_to_rank1":  # every token chooses among rank 0's experts: rank 1 receives nothing
            idx = torch.stack([torch.randperm(El, generator=g)[:K] for _ in range(T)])
        elif name == "rank0_sends_none" and r == 0:  # every slot of rank 0 dropped (capacity)
            idx = torch.full_like(idx, -1)
        x_TD = torch.randn(T, D, generator=g, dtype=torch.float64)
        x_TKD = torch.randn(T, K, D, generator=g, dtype=torch.float64)
        gy = torch.randn(T, K, D, generator=g, dtype=torch.float64)
        cases.append((x_TD, x_TKD, idx, gy))
    return cases


def dispatch_worker(rank: int, world: int, E: int, K: int, D: int, H: int, case_names: list):
    import torch.distributed as dist

    from molm_ds.parallel.dispatch import AllToAllDispatcher

    torch.manual_seed(0)
    full = MLPExperts(E, D, H).double()
    El = E // world
    local = MLPExperts(El, D, H).double()
    with torch.no_grad():
        local.w1.copy_(full.w1[rank * El:(rank + 1) * El])
        local.w2.copy_(full.w2[rank * El:(rank + 1) * El])
    a2a = AllToAllDispatcher(E, group=dist.group.WORLD)
    ref = LocalDispatcher(E)
    out = {}
    for name in case_names:
        cases = make_case(name, world, E, K, D)
        for form in ("TD", "TKD"):
            # reference: every rank's shard through the local dispatcher and the full experts
            full.zero_grad()
            ref_y, ref_gx = [], []
            for x_TD, x_TKD, idx, gy in cases:
                x = (x_TD if form == "TD" else x_TKD).clone().requires_grad_(True)
                if x.shape[0] == 0:  # LocalDispatcher.undispatch cannot view 0 rows as [0, K, -1]
                    ref_y.append(torch.zeros(0, K, D, dtype=x.dtype))
                    ref_gx.append(torch.zeros_like(x))
                    continue
                plan = ref.plan(idx)
                y = ref.undispatch(full(ref.dispatch(x, plan), plan.counts), plan)
                (y * gy).sum().backward()
                ref_y.append(y.detach())
                ref_gx.append(x.grad)
            # expert parallel: this rank's shard, this rank's experts
            local.zero_grad()
            x_TD, x_TKD, idx, gy = cases[rank]
            x = (x_TD if form == "TD" else x_TKD).clone().requires_grad_(True)
            plan = a2a.plan(idx)
            x_ND, counts_El = a2a.dispatch(x, plan), plan.counts_E
            y = a2a.undispatch(local(x_ND, plan.counts), plan)
            (y * gy).sum().backward()
            # the fused combine against its slow path (undispatch, then the weighted sum), same plan
            w0 = torch.rand(idx.shape, generator=torch.Generator().manual_seed(7 + rank), dtype=torch.float64)
            comb = {}
            for fused in (True, False):
                xc, wc = x.detach().clone().requires_grad_(True), w0.clone().requires_grad_(True)
                y_ND = local(a2a.dispatch(xc, plan), plan.counts)
                yc = a2a.combine(y_ND, wc, plan) if fused else combine_reference(wc, a2a.undispatch(y_ND, plan))
                gy_TD = gy.sum(1)
                comb[fused] = (yc.detach(), *torch.autograd.grad((yc * gy_TD).sum(), (xc, wc)))
            all_idx = torch.cat([c[2].reshape(-1) for c in cases])
            out[(name, form)] = dict(
                y=y.detach(), ref_y=ref_y[rank], gx=x.grad, ref_gx=ref_gx[rank],
                gw1=local.w1.grad, ref_gw1=full.w1.grad[rank * El:(rank + 1) * El],
                gw2=local.w2.grad, ref_gw2=full.w2.grad[rank * El:(rank + 1) * El],
                counts_El=counts_El, ref_counts_El=torch.bincount(all_idx[all_idx >= 0], minlength=E)[rank * El:(rank + 1) * El],
                rows=x_ND.shape[0],
                comb=comb[True][0], ref_comb=comb[False][0], gcx=comb[True][1], ref_gcx=comb[False][1],
                gcw=comb[True][2], ref_gcw=comb[False][2],
            )
    return out
