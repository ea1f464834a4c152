"""Stick-breaking attention forward+backward: ours (molm_ds.ops.stickbreaking_attention: block-wise on
CPU, Triton on CUDA) vs causal scaled_dot_product_attention vs the naive O(T^2) reference.

    python benchmarks/stickbreaking.py                   # CPU fp32 B=4 heads=8 T=1024 d=64
    python benchmarks/stickbreaking.py --device cuda --dtype bfloat16 --seq 4096

Two input sets, timed side by side: `random` (q, k, v ~ N(0, 1): logits ~ N(0, 1), so each row spends
its stick within ~50 keys and the CPU path's early exit skips the far key tiles) and `long_stick` (a
shared component makes every logit ~ -8, so sigmoid ~ 3e-4 and the stick lasts past 1024 keys: no
tile can be skipped, the worst case for ours; SDPA's cost does not depend on the values).

Prints a table, then one JSON line: ours_over_sdpa (random inputs), ours_over_sdpa_long_stick,
naive_over_ours, naive_peak_over_ours_peak.
Peak memory: CUDA max_memory_allocated on GPU; on CPU the largest live tensor set is estimated
by the profiler's memory accounting (self CPU memory peak).
Variants are interleaved (ours, sdpa, naive, ours, ...) and medians taken, so load changes on a
shared machine hit all alike. `--omp-wait-policy passive` sets OMP_WAIT_POLICY before torch loads.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

if __name__ == "__main__" and "--omp-wait-policy" in sys.argv:  # must happen before torch loads OpenMP
    os.environ["OMP_WAIT_POLICY"] = sys.argv[sys.argv.index("--omp-wait-policy") + 1].upper()

import torch  # noqa: E402
from _timing import ratio, time_interleaved  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from molm_ds.ops import stickbreaking_attention, stickbreaking_reference  # noqa: E402


def peak_bytes(fn, device):
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # running sum of allocations/frees (self, not nested totals) in event order gives the peak live bytes
    live = peak = 0
    for ev in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += ev.self_cpu_memory_usage or 0  # self: a parent op's figure already includes its children
        peak = max(peak, live)
    return max(peak, 1)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--omp-wait-policy", choices=["passive", "active"], default=None, help="set OMP_WAIT_POLICY (before torch loads)")
    a = p.parse_args()
    dt = getattr(torch, a.dtype)
    torch.manual_seed(0)
    shape = (a.batch, a.heads, a.seq, a.head_dim)
    q, k, v = (torch.randn(shape, device=a.device, dtype=dt, requires_grad=True) for _ in range(3))
    # long stick: q_0 = c, k_0 = -c with c^2 = 8 sqrt(d) gives q.k / sqrt(d) ~ -8 (+ N(0, 1) from the other dims)
    c = math.sqrt(8.0 * math.sqrt(a.head_dim))
    with torch.no_grad():
        ql, kl = q.detach().clone(), k.detach().clone()
        ql[..., 0], kl[..., 0] = c, -c
    ql.requires_grad_(), kl.requires_grad_()

    def run(f, q, k, v):
        def step():
            for t in (q, k, v):
                t.grad = None
            f(q, k, v).sum().backward()
        return step

    sdpa_f = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    ours = run(stickbreaking_attention, q, k, v)
    naive = run(stickbreaking_reference, q, k, v)
    fns = {"ours": ours, "sdpa": run(sdpa_f, q, k, v), "naive": naive,
           "ours long_stick": run(stickbreaking_attention, ql, kl, v), "sdpa long_stick": run(sdpa_f, ql, kl, v)}
    t = time_interleaved(fns, a.iters, a.warmup, a.device)
    mem = {name: peak_bytes(f, a.device) for name, f in [("ours", ours), ("naive", naive)]}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"stick-breaking fwd+bwd  B={a.batch} heads={a.heads} T={a.seq} d={a.head_dim} {a.dtype} {a.device}  threads={torch.get_num_threads()}"
          f" OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')} load1={load:.1f} iters={a.iters}")
    print(f"{'impl':<18}{'median ms':>12}{'peak MiB':>12}")
    for name in t:
        m = f"{mem[name] / 2**20:12.1f}" if name in mem else f"{'-':>12}"
        print(f"{name:<18}{t[name] * 1e3:>12.1f}{m}")
    print(json.dumps({"ours_over_sdpa": ratio(t["ours"] / t["sdpa"]),
                      "ours_over_sdpa_long_stick": ratio(t["ours long_stick"] / t["sdpa long_stick"]),
                      "naive_over_ours": ratio(t["naive"] / t["ours"]),
                      "naive_peak_over_ours_peak": ratio(mem["naive"] / mem["ours"])}))


if __name__ == "__main__":
    main()
