"""S1: the MI load-balance loss against Switch's balance loss and no balance loss.

    python -m experiments.s1_balance --out runs/science/s1 [--data data/science] [--seeds 1,2,3]
        [--lrs 3e-3,1e-2,3e-2] [--steps 300] [--weight 0.01] [--jobs 2]

Paper (ModuleFormer, arXiv 2306.04640): the mutual-information loss L_MI = H(m|x) - H(m) balances the
experts' load (high H(m)) while making each token's routing confident (low H(m|x)). Grid: tiny preset
from scratch on prose + code 50/50, every method at every lr and seed; each method is reported at its
own best lr (lowest mean validation loss over seeds); everything in the tables is measured on the test
split (whole documents held out, never used to choose anything). Routing is measured on those windows:
H(m|x)/log E (lower = sharper), H(m)/log E (1 = the mean routing probabilities are uniform: what
the MI loss maximises), max/mean token count per expert (1 = perfectly balanced), both the mean
over the 4 MoE sub-layers and the 2 domains.
"""

from __future__ import annotations

import os
import time

from experiments.science import common as c
from molm_ds import cli

METHODS = ("none", "switch", "mi")
DOMAINS = ("prose", "code")


def extra(p):
    p.add_argument("--weight", type=float, default=0.01, help="weight of the MI / Switch loss")


def runs(s: c.Settings, weight: float) -> list[c.Run]:
    out = []
    sources = [{"path": s.domain(d), "weight": 0.5} for d in DOMAINS]
    for method in METHODS:
        w = {"mi": 0.0, "switch": 0.0, "z": 0.0, "load_concentration": 0.0}
        if method != "none":
            w[method] = weight
        for lr in s.lrs:
            for seed in s.seeds:
                job = c.base_job(s, sources=sources, seed=seed, lr=lr)
                job["training"]["loss_weights"] = w
                out.append(c.Run(f"{method}_lr{lr:g}_s{seed}", job, after=c.measure_cmds(s, DOMAINS),
                                 group={"method": method, "lr": lr, "seed": seed}))
    return out


def row(s: c.Settings, run: c.Run) -> dict | None:
    v = c.read_json(os.path.join(c.run_dir(s, run), "measure.json"))
    m = c.read_json(os.path.join(c.run_dir(s, run), "measure_test.json"))
    if m is None or v is None:
        return None
    r = dict(run.group)
    r["val_loss"] = sum(v["domains"][d]["loss"] for d in DOMAINS) / len(DOMAINS)  # chooses the lr
    r["test_loss"] = sum(m["domains"][d]["loss"] for d in DOMAINS) / len(DOMAINS)
    r["H_rel"] = sum(c.sublayer_mean(m, d, "H_m_given_x_rel") for d in DOMAINS) / len(DOMAINS)
    r["H_rel_mlp"] = sum(c.sublayer_mean(m, d, "H_m_given_x_rel", "mlp") for d in DOMAINS) / len(DOMAINS)
    r["H_m_rel"] = sum(c.sublayer_mean(m, d, "H_m_rel") for d in DOMAINS) / len(DOMAINS)
    r["max_mean"] = sum(c.sublayer_mean(m, d, "max_over_mean_load") for d in DOMAINS) / len(DOMAINS)
    r["max_mean_mlp"] = sum(c.sublayer_mean(m, d, "max_over_mean_load", "mlp") for d in DOMAINS) / len(DOMAINS)
    r["pooled_max_mean"], r["pooled_H_m_rel"] = c.pooled_balance(m, DOMAINS)
    r["pooled_max_mean_mlp"], _ = c.pooled_balance(m, DOMAINS, "mlp")
    r["train_loss"] = c.last_metrics(os.path.join(c.run_dir(s, run), "metrics.jsonl")).get("lm_loss")
    return r


COLUMNS = [("val_loss", "val loss (selects the lr)", 3), ("test_loss", "test loss (prose+code)", 3), ("H_rel", "H(m|x)/log E", 3), ("H_rel_mlp", "… MLP only", 3),
           ("H_m_rel", "H(m)/log E per domain", 3), ("max_mean", "max/mean load per domain", 2),
           ("max_mean_mlp", "… MLP only", 2), ("pooled_H_m_rel", "H(m)/log E, domains pooled", 3),
           ("pooled_max_mean", "max/mean, pooled", 2), ("pooled_max_mean_mlp", "… MLP only", 2)]


def main(argv=None) -> int:
    s, a = c.parse("s1_balance", __doc__, lrs="3e-3,1e-2,3e-2", steps=300, argv=argv, extra=extra)
    c.check_inputs(s, DOMAINS)
    t0 = time.time()
    grid = runs(s, a.weight)
    c.execute(s, [grid], report_only=a.report_only)
    rows = [r for r in (row(s, run) for run in grid) if r is not None]
    agg = c.aggregate(rows, [k for k, _, _ in COLUMNS] + ["train_loss"], select="val_loss")
    total = c.add_wall(s, time.time() - t0)
    body = (f"{len(rows)}/{len(grid)} runs finished. Each method at its best lr (lowest mean val loss):\n\n"
            + c.markdown(agg, COLUMNS, order=METHODS, all_lrs=False)
            + "\n\nEvery lr:\n\n" + c.markdown(agg, COLUMNS, order=METHODS, all_lrs=True))
    png = c.plot(agg, "pooled_max_mean", "max/mean expert load (test, domains pooled)", os.path.join(s.out, "s1.png"), METHODS,
                 f"S1: load balance, weight {a.weight:g}")
    c.plot(agg, "test_loss", "test loss", os.path.join(s.out, "s1_test.png"), METHODS, "S1: test loss")
    body += f"\n\nPlots: {os.path.basename(png) if png else '(matplotlib missing: no plot)'}, s1_test.png"
    c.write_report(s, f"S1: MI vs Switch load balance (weight {a.weight:g})", body,
                   {"aggregate": agg, "rows": rows}, total)
    return 0 if len(rows) == len(grid) else 1


if __name__ == "__main__":
    cli.run(main)
