"""MoE MLP layer forward+backward: ours (molm_ds.model.MoEMLP: router -> dispatch -> grouped GEMM
experts -> undispatch -> combine) vs a dense MLP over the same k*T tokens (the limit) vs DeepSpeed's
stock `deepspeed.moe.layer.MoE` (top-k gating, capacity factor 1.25; 0.19.8 dispatches with gathers).

    python benchmarks/moe_layer.py                       # CPU fp32 T=4096 D=512 H=1024 E=16 k=2
    python benchmarks/moe_layer.py --device cuda --dtype bfloat16 --tokens 16384

Prints a table, then one JSON line: ours_over_dense, deepspeed_over_ours (median times, same run).
The variants are interleaved (ours, dense, deepspeed, ours, ...) so load changes on a shared machine
hit all of them alike. `--omp-wait-policy passive` sets OMP_WAIT_POLICY before torch is imported
(idle OpenMP threads sleep instead of spinning: much faster for everything on an oversubscribed CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

if __name__ == "__main__" and "--omp-wait-policy" in sys.argv:  # must happen before torch loads OpenMP
    os.environ["OMP_WAIT_POLICY"] = sys.argv[sys.argv.index("--omp-wait-policy") + 1].upper()

import torch  # noqa: E402
from _timing import ratio, time_interleaved  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402


class DenseMLP(nn.Module):
    def __init__(self, D, H):
        super().__init__()
        self.w1 = nn.Linear(D, H, bias=False)
        self.w2 = nn.Linear(H, D, bias=False)

    def forward(self, x):
        return self.w2(F.gelu(self.w1(x), approximate="tanh"))


def build_ours(D, H, E, k):
    from molm_ds.config import ModelConfig
    from molm_ds.model.moe import MoEMLP

    cfg = ModelConfig(d_model=D, att_hidden=D, n_mlp_experts=E, k_mlp=k, ffd_hidden=H)
    return MoEMLP(cfg)


def build_deepspeed(D, H, E, k):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29531")
        dist.init_process_group("gloo", rank=0, world_size=1)
    from deepspeed.moe.layer import MoE

    return MoE(hidden_size=D, expert=DenseMLP(D, H), num_experts=E, ep_size=1, k=k, capacity_factor=1.25, eval_capacity_factor=1.25, min_capacity=4, drop_tokens=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-deepspeed", action="store_true")
    p.add_argument("--omp-wait-policy", choices=["passive", "active"], default=None, help="set OMP_WAIT_POLICY (before torch loads)")
    a = p.parse_args()
    dt = getattr(torch, a.dtype)
    T, D, H, E, k = a.tokens, a.d_model, a.hidden, a.experts, a.k
    torch.manual_seed(0)

    ours = build_ours(D, H, E, k).to(a.device, dt)
    dense = DenseMLP(D, H).to(a.device, dt)
    x = torch.randn(1, T, D, device=a.device, dtype=dt, requires_grad=True)
    x_kT = torch.randn(k * T, D, device=a.device, dtype=dt, requires_grad=True)

    # gradients are reset to None each step (as a training loop does), so no run pays for accumulation
    def run_ours():
        x.grad = None
        ours.zero_grad(set_to_none=True)
        y, _ = ours(x)
        y.sum().backward()

    def run_dense():
        x_kT.grad = None
        dense.zero_grad(set_to_none=True)
        dense(x_kT).sum().backward()

    fns = {"ours MoEMLP": run_ours, "dense MLP k*T tokens": run_dense}
    if not a.no_deepspeed:
        ds = build_deepspeed(D, H, E, k).to(a.device, dt)

        def run_ds():
            x.grad = None
            ds.zero_grad(set_to_none=True)
            y, _, _ = ds(x)
            y.sum().backward()

        fns["deepspeed.moe MoE cf=1.25"] = run_ds
    t = time_interleaved(fns, a.iters, a.warmup, a.device)
    rows = list(t.items())
    res = {"ours_over_dense": t["ours MoEMLP"] / t["dense MLP k*T tokens"]}
    if not a.no_deepspeed:
        res["deepspeed_over_ours"] = t["deepspeed.moe MoE cf=1.25"] / t["ours MoEMLP"]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"MoE MLP fwd+bwd  T={T} D={D} H={H} E={E} k={k} {a.dtype} {a.device}  MOLM_DS_KERNELS={os.environ.get('MOLM_DS_KERNELS', 'auto')}"
          f"  threads={torch.get_num_threads()} OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')} load1={load:.1f}  iters={a.iters}")
    print(f"{'layer':<28}{'median ms':>12}")
    for name, t in rows:
        print(f"{name:<28}{t * 1e3:>12.1f}")
    print(json.dumps({key: ratio(v) for key, v in res.items()}))


if __name__ == "__main__":
    main()
