"""What ``training.deterministic`` costs: one training step (forward + backward) of a whole MoLM, default vs
deterministic mode (torch.use_deterministic_algorithms(True): the MoE combine and token gather as sorted,
atomic-free reductions, the fused PyTorch gather/combine GEMM path bypassed), interleaved on the same model.

    python benchmarks/deterministic.py                         # CPU fp32, the small preset, 8 x 256 tokens
    python benchmarks/deterministic.py --device cuda --dtype bfloat16 --preset molm-350m-4b --batch 8 --seq 1024

Prints the two median step times, then one JSON line: deterministic_over_default (> 1: slower).
"""

from __future__ import annotations

import argparse
import contextlib
import json

import torch
from _timing import time_interleaved


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    a = p.parse_args()

    from molm_ds.config import ModelConfig
    from molm_ds.model import MoLM

    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(a.preset)
    model = MoLM(cfg).to(a.device, getattr(torch, a.dtype)).train()
    ids = torch.randint(0, cfg.vocab_size, (a.batch, a.seq), device=a.device)

    def step(det: bool):
        @contextlib.contextmanager
        def mode():
            torch.use_deterministic_algorithms(det)
            try:
                yield
            finally:
                torch.use_deterministic_algorithms(False)

        def run():
            with mode():
                model.zero_grad(set_to_none=True)
                model(ids).logits.float().logsumexp(-1).mean().backward()
        return run

    t = time_interleaved({"default": step(False), "deterministic": step(True)}, a.iters, a.warmup, a.device)
    for k, v in t.items():
        print(f"{k:>14}: {v * 1e3:9.1f} ms/step  ({a.preset}, {a.batch}x{a.seq} tokens, {a.device} {a.dtype})")
    print(json.dumps({"deterministic_over_default": t["deterministic"] / t["default"]}))


if __name__ == "__main__":
    main()
