"""S2: a sparse MoLM against a dense model with the same active parameters, on the same tokens.

    python -m experiments.s2_dense --out runs/science/s2 [--data data/science] [--seeds 1,2,3]
        [--lrs 3e-3,1e-2,3e-2] [--steps 300] [--jobs 2] [--reuse-moe runs/science/s1] [--preset small]

Paper (ModuleFormer, arXiv 2306.04640): at equal compute (active parameters per token) the sparse
model reaches a lower loss than a dense one. Here: the tiny preset (4 attention experts of width 64,
k 2; 4 MLP experts of hidden 128, k 2; MI loss 0.01) against the same network with every expert always
active: 2 attention experts with k 2 (all chosen, gated by their softmax) and one MLP expert of hidden 256
(gate 1), no balance loss. Both have the same active parameters and FLOPs per token (the MoE holds 2x
the expert parameters). Same data (prose + code 50/50), steps and batch; each at its own best lr (by
validation loss; reported on the test split). --preset small runs the same comparison one step up (4
layers, d_model 128, 4 attention experts of width 128, 8 MLP experts of hidden 256, k 2; the dense twin has
2 attention experts and one MLP expert of hidden 512), with the corpus's 512-token vocabulary.
"""

from __future__ import annotations

import os
import time

from experiments.s1_balance import DOMAINS
from experiments.science import common as c
from molm_ds import cli

METHODS = ("moe", "dense")
DENSE = {"n_att_experts": 2, "k_att": 2, "n_mlp_experts": 1, "k_mlp": 1, "ffd_hidden": 256}


def dense_overrides(preset: str) -> dict:
    """The preset with every expert always active and the same active parameters: E = k attention experts, one
    MLP expert k times as wide (gate 1)."""
    from molm_ds.config import ModelConfig

    cfg = ModelConfig.from_preset(preset)
    return {"n_att_experts": cfg.k_att, "k_att": cfg.k_att, "n_mlp_experts": 1, "k_mlp": 1,
            "ffd_hidden": cfg.k_mlp * cfg.ffd_hidden}


def extra(p):
    p.add_argument("--preset", default="tiny", choices=("tiny", "small"), help="model size of both networks")
    p.add_argument("--reuse-moe", default=None, metavar="S1_OUT",
                   help="an S1 grid: its 'mi' runs are this grid's MoE runs (the same job file but the name, "
                        "checked), copied instead of trained again")


def runs(s: c.Settings, reuse: str | None = None, preset: str = "tiny") -> list[c.Run]:
    out = []
    sources = [{"path": s.domain(d), "weight": 0.5} for d in DOMAINS]
    for method in METHODS:
        for lr in s.lrs:
            for seed in s.seeds:
                job = c.base_job(s, sources=sources, seed=seed, lr=lr)
                job["training"]["loss_weights"] = {"mi": 0.01, "switch": 0.0, "z": 0.0, "load_concentration": 0.0}
                if preset != "tiny":
                    job["model"] = {"preset": preset, "overrides": {"vocab_size": 512}}  # the corpus's vocabulary
                if method == "dense":
                    job["model"]["overrides"] = {**job["model"].get("overrides", {}), **dense_overrides(preset)}
                    job["training"]["loss_weights"] = {"mi": 0.0}
                twin = os.path.join(reuse, "runs", f"mi_lr{lr:g}_s{seed}") if reuse and method == "moe" else None
                out.append(c.Run(f"{method}_lr{lr:g}_s{seed}", job, after=c.measure_cmds(s, DOMAINS),
                                 group={"method": method, "lr": lr, "seed": seed}, reuse=twin))
    return out


def params(run_dir: str) -> tuple[int, int]:
    """(total, active) parameters from the trainer's start-up line (the trainer's own count)."""
    import re

    with open(os.path.join(run_dir, "log.txt")) as f:
        m = re.search(r"training ([\d,]+) parameters \(([\d,]+) active\)", f.read())
    return (int(m.group(1).replace(",", "")), int(m.group(2).replace(",", ""))) if m else (0, 0)


def row(s: c.Settings, run: c.Run) -> dict | None:
    d = c.run_dir(s, run)
    v = c.read_json(os.path.join(d, "measure.json"))
    m = c.read_json(os.path.join(d, "measure_test.json"))
    if m is None or v is None:
        return None
    r = dict(run.group)
    r["val_loss"] = sum(v["domains"][x]["loss"] for x in DOMAINS) / len(DOMAINS)  # chooses the lr
    r["test_loss"] = sum(m["domains"][x]["loss"] for x in DOMAINS) / len(DOMAINS)
    for x in DOMAINS:
        r[f"{x}_loss"] = m["domains"][x]["loss"]
    r["params"], r["active"] = params(d)
    return r


COLUMNS = [("val_loss", "val loss (selects the lr)", 3), ("test_loss", "test loss (mean of domains)", 3),
           ("prose_loss", "prose (test)", 3), ("code_loss", "code (test)", 3),
           ("params", "params", 0), ("active", "active params", 0)]


def main(argv=None) -> int:
    s, a = c.parse("s2_dense", __doc__, lrs="3e-3,1e-2,3e-2", steps=300, argv=argv, extra=extra)
    c.check_inputs(s, DOMAINS)
    t0 = time.time()
    grid = runs(s, a.reuse_moe, a.preset)
    c.execute(s, [grid], report_only=a.report_only)
    rows = [r for r in (row(s, run) for run in grid) if r is not None]
    agg = c.aggregate(rows, [k for k, _, _ in COLUMNS], select="val_loss")
    total = c.add_wall(s, time.time() - t0)
    body = (f"{len(rows)}/{len(grid)} runs finished. Each model at its best lr:\n\n"
            + c.markdown(agg, COLUMNS, order=METHODS, all_lrs=False)
            + "\n\nEvery lr:\n\n" + c.markdown(agg, COLUMNS, order=METHODS, all_lrs=True))
    png = c.plot(agg, "test_loss", "test loss", os.path.join(s.out, "s2.png"), METHODS,
                 "S2: MoE vs dense, equal active parameters")
    body += f"\n\nPlot: {os.path.basename(png) if png else '(matplotlib missing: no plot)'}"
    c.write_report(s, "S2: MoE vs dense at equal active parameters", body, {"aggregate": agg, "rows": rows}, total)
    return 0 if len(rows) == len(grid) else 1


if __name__ == "__main__":
    cli.run(main)
