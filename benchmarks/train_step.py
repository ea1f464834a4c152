"""MoLM training step (forward, loss with the aux terms, backward, AdamW step): torch.compile vs eager.

    python benchmarks/train_step.py                               # CPU fp32, small preset, inductor
    python benchmarks/train_step.py --preset tiny --backend aot_eager
    python benchmarks/train_step.py --device cuda --dtype bfloat16 --preset molm-350m-4b --batch 4 --seq 1024

The compiled model is ``torch.compile(model.forward, fullgraph=True)`` (what ``training.compile: true``
does at ep_size 1); both variants start from the same weights and are timed interleaved after
``--warmup`` steps (the first compiled step pays the compilation, reported separately). Prints a table,
then one JSON line: compiled_over_eager (median step time ratio; < 1 means compiled is faster),
compile_seconds, and the loss difference of the first step.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

if __name__ == "__main__" and "--omp-wait-policy" in sys.argv:  # must happen before torch loads OpenMP
    os.environ["OMP_WAIT_POLICY"] = sys.argv[sys.argv.index("--omp-wait-policy") + 1].upper()

import torch  # noqa: E402
from _timing import time_interleaved  # noqa: E402


def make_step(model, x, y, device):
    from molm_ds.train.evaluate import lm_loss

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        out = model(x)
        loss = lm_loss(logits_BTV=out.logits, labels_BT=y) + 0.01 * out.aux["mi"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()
    return step


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--backend", default="inductor", choices=["inductor", "aot_eager", "eager"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--omp-wait-policy", choices=["active", "passive"], help="set OMP_WAIT_POLICY before torch loads")
    a = p.parse_args(argv)

    from molm_ds.config import ModelConfig
    from molm_ds.model import MoLM

    dtype = getattr(torch, a.dtype)
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(a.preset)
    eager = MoLM(cfg).to(a.device, dtype).train()
    compiled = copy.deepcopy(eager)
    compiled.forward = torch.compile(compiled.forward, backend=a.backend, fullgraph=True)
    x = torch.randint(0, cfg.vocab_size, (a.batch, a.seq), device=a.device)
    y = torch.randint(0, cfg.vocab_size, (a.batch, a.seq), device=a.device)
    steps = {"eager": make_step(eager, x, y, a.device), "compiled": make_step(compiled, x, y, a.device)}

    first_eager = steps["eager"]()
    t = time.perf_counter()
    first_compiled = steps["compiled"]()
    compile_s = time.perf_counter() - t
    times = time_interleaved(steps, a.iters, a.warmup, a.device)
    ratio = times["compiled"] / times["eager"]
    print(f"MoLM {a.preset} train step, B={a.batch} T={a.seq} {a.dtype} on {a.device}, backend {a.backend}")
    print(f"{'variant':<10} {'ms/step':>10}")
    for name, s in times.items():
        print(f"{name:<10} {s * 1e3:>10.1f}")
    print(f"first compiled step (compilation): {compile_s:.1f} s")
    print(json.dumps({"compiled_over_eager": round(ratio, 4), "compile_seconds": round(compile_s, 1),
                      "first_step_loss_diff": float((first_compiled.float() - first_eager.float()).abs())}))


if __name__ == "__main__":
    main()
