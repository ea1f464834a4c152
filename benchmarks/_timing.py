"""Side-by-side timing shared by the benchmark scripts (imported after torch's OpenMP settings are fixed)."""

from __future__ import annotations

import statistics
import time

import torch


def time_interleaved(fns: dict, iters: int, warmup: int, device: str) -> dict:
    """Median seconds per variant; each round runs every variant once (round-robin), so load changes on a
    shared machine hit all variants alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    ts = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            ts[name].append(time.perf_counter() - t)
    return {name: statistics.median(v) for name, v in ts.items()}


def ratio(x: float, digits: int = 4) -> float:
    """A ratio to print: ``digits`` significant digits (a fixed number of decimals prints a tiny ratio as 0)."""
    return float(f"{x:.{digits}g}")
