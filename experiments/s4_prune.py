"""S4: fine-tuning with load concentration, then pruning the experts the task does not use.

    python -m experiments.s4_prune --out runs/science/s4 [--data data/science] [--seeds 1,2,3]
        [--lrs 1e-3,3e-3] [--steps 150] [--weights 0,1,0.1] [--taus 0.01,0.1,0.3]
        [--base-steps 400] [--base-lr 1e-2] [--jobs 2]

Paper (ModuleFormer, arXiv 2306.04640): fine-tuning with the load-concentration loss H(m) makes a task
use few experts, so the unused ones can be removed with little loss. Grid: per seed one tiny base
pretrained on prose + code 50/50, then --steps on code with load_concentration_weight w (MI loss off),
then `launch/prune.py --sweep` (expert use counted on 32 x 8 code training windows; perplexity on 200 x 8
held-out code windows, the same for every run). Each weight at its own best lr by the unpruned code
perplexity; for every tau: parameters kept and code perplexity after pruning.
"""

from __future__ import annotations

import math
import os
import time

from experiments.science import common as c
from molm_ds import cli

DOMAINS = ("prose", "code")


def extra(p):
    p.add_argument("--weights", default="0,1,0.1", help="load-concentration weights, run in this order")
    p.add_argument("--taus", default="0.01,0.1,0.3", help="prune thresholds on f_m / max f")
    p.add_argument("--base-steps", type=int, default=400, help="pretraining steps of the base models")
    p.add_argument("--base-lr", type=float, default=1e-2, help="lr of the base models")
    p.add_argument("--prune-eval-batches", type=int, default=200, help="held-out batches of 8 x 64 code tokens")


def method(w: float) -> str:
    return f"conc{w:g}"


def grid(s: c.Settings, a) -> tuple[list[c.Run], list[c.Run]]:
    weights = [float(x) for x in a.weights.split(",")]
    prune = ["launch/prune.py", "--checkpoint", "{run}/checkpoints", "--data", s.domain("code"), "--sweep", a.taus,
             "--out", "{run}/prune", "--batches", "32", "--batch-size", "8", "--eval-batches",
             str(a.prune_eval_batches), "--seq-len", str(s.seq_len), "--no-hf"]
    bases, runs = [], []
    for seed in s.seeds:
        job = c.base_job(s, sources=[{"path": s.domain(d), "weight": 0.5} for d in DOMAINS], seed=seed,
                         lr=a.base_lr, steps=a.base_steps)
        bases.append(c.Run(f"base_s{seed}", job, after=[prune], group={"seed": seed}))
    for w in weights:
        for lr in s.lrs:
            for seed in s.seeds:
                job = c.base_job(s, sources=[{"path": s.domain("code")}], seed=seed, lr=lr)
                job["init_from"] = os.path.join(c.run_dir(s, bases[s.seeds.index(seed)]), "checkpoints")
                job["training"]["loss_weights"] = {"mi": 0.0}
                job["finetune"] = {"load_concentration_weight": w}
                runs.append(c.Run(f"{method(w)}_lr{lr:g}_s{seed}", job, after=[prune],
                                  group={"method": method(w), "lr": lr, "seed": seed}))
    return bases, runs


def row(s: c.Settings, run: c.Run) -> dict | None:
    d = c.run_dir(s, run)
    sw = c.read_json(os.path.join(d, "prune", "sweep.json"))
    fr = c.read_json(os.path.join(d, "prune", "frequencies.json"))
    if sw is None or fr is None:
        return None
    r = dict(run.group)
    r["ppl"] = sw["unpruned"]["ppl"]
    r["log_ppl"] = math.log(r["ppl"])
    r["H_m_sum"] = sum(v["H_m"] for v in fr.values())
    for p in sw["rows"]:
        r[f"kept@{p['tau']:g}"] = 100.0 * p["params_kept"]
        r[f"ppl@{p['tau']:g}"] = p["ppl"]
    return r


def main(argv=None) -> int:
    s, a = c.parse("s4_prune", __doc__, lrs="1e-3,3e-3", steps=150, argv=argv, extra=extra)
    try:
        weights = [float(x) for x in a.weights.split(",")]
        taus = [float(x) for x in a.taus.split(",")]
    except ValueError:
        raise c.ConfigError(f"--weights {a.weights!r} / --taus {a.taus!r}: expected comma-separated numbers") from None
    c.check_inputs(s, DOMAINS)
    t0 = time.time()
    bases, runs = grid(s, a)
    c.execute(s, [bases, runs], report_only=a.report_only)
    rows = [r for r in (row(s, run) for run in runs) if r is not None]
    cols = [("ppl", "code ppl, unpruned", 2), ("H_m_sum", "Σ H(m)", 2)]
    for t in taus:
        cols += [(f"kept@{t:g}", f"τ={t:g}: % params kept", 1), (f"ppl@{t:g}", f"τ={t:g}: ppl", 2)]
    order = [method(w) for w in weights]
    agg = c.aggregate(rows, [k for k, _, _ in cols] + ["log_ppl"], select="log_ppl")
    brows = [r for r in (row(s, b) for b in bases) if r is not None]
    for r in brows:
        r.update(method="base (no fine-tune)", lr=a.base_lr)
    bagg = c.aggregate(brows, [k for k, _, _ in cols] + ["log_ppl"], select="log_ppl") if brows else {}
    total = c.add_wall(s, time.time() - t0)
    body = (f"{len(rows)}/{len(runs)} fine-tunes finished. Each weight at its best lr (lowest mean unpruned code "
            "perplexity):\n\n" + c.markdown({**bagg, **agg}, cols, order=["base (no fine-tune)"] + order, all_lrs=False)
            + "\n\nEvery lr:\n\n" + c.markdown(agg, cols, order=order, all_lrs=True))
    png = c.plot(agg, "ppl", "code perplexity, unpruned", os.path.join(s.out, "s4.png"), order,
                 "S4: fine-tuning with load concentration")
    body += f"\n\nPlot: {png or '(matplotlib missing: no plot)'}"
    c.write_report(s, "S4: load concentration, then pruning", body, {"aggregate": agg, "rows": rows,
                                                                     "bases": brows}, total)
    return 0 if len(rows) == len(runs) else 1


if __name__ == "__main__":
    cli.run(main)
