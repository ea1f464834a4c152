"""S4: fine-tuning with load concentration, then pruning, against plain fine-tuning pruned to the same size.

    python -m experiments.s4_prune --out runs/science/s4 [--data data/science] [--seeds 1,2,3]
        [--lrs 3e-3,1e-2] [--steps 150] [--weights 0,0.01,0.03,0.1,1] [--taus 0.1,0.3,0.5]
        [--base-steps 400] [--base-lr 1e-2] [--jobs 2] [--publish docs/science/s4_prune]

Paper (ModuleFormer, arXiv 2306.04640): fine-tuning with the load-concentration loss H(m) makes a task
use few experts, so the unused ones can be removed with little loss. Grid: per seed one tiny base
pretrained on prose + code 50/50, then --steps on code with load_concentration_weight w (MI loss off;
w = 0 is the plain fine-tune). Each weight's lr is chosen by its mean code perplexity on the validation
split (measure.py, --windows windows); everything reported is on the test split (whole documents never
trained on, data.split_by document).

Pruning (launch/prune.py, expert use counted on 32 x 8 code training windows, perplexity on
--prune-eval-batches x 8 test windows, the same for every model): each fine-tune at its chosen lr is
pruned at every tau (f_m / max f >= tau). Then, at equal size: the plain fine-tune of the same seed is
pruned to exactly the concentrated model's per-layer expert counts at each tau (`--match`), keeping its
most used experts (frequency) or its highest REAP scores (router-weighted activation, arXiv 2510.13999),
and the concentrated model is also pruned to its own counts by REAP. Taus only change measurement: a new
--taus on the same --out prunes the finished checkpoints again without training.
"""

from __future__ import annotations

import math
import os
import time

from experiments.science import common as c
from molm_ds import cli, rundir

DOMAINS = ("prose", "code")
CRITERIA = ("frequency", "reap")


def extra(p):
    p.add_argument("--weights", default="0,0.01,0.03,0.1,1",
                   help="load-concentration weights (0 = plain fine-tuning, the matched baseline; must be included)")
    p.add_argument("--taus", default="0.1,0.3,0.5", help="prune thresholds on f_m / max f")
    p.add_argument("--base-steps", type=int, default=400, help="pretraining steps of the base models")
    p.add_argument("--base-lr", type=float, default=1e-2, help="lr of the base models")
    p.add_argument("--prune-eval-batches", type=int, default=200, help="test batches of 8 x 64 code tokens")


def method(w: float) -> str:
    return f"conc{w:g}"


def prune_cmd(s: c.Settings, a, ckpt: str, out: str, *extra_args: str) -> list[str]:
    return ["launch/prune.py", "--checkpoint", ckpt, "--data", s.domain("code"), "--out", out, "--batches", "32",
            "--batch-size", "8", "--eval-batches", str(a.prune_eval_batches), "--seq-len", str(s.seq_len), "--no-hf",
            "--split", "test", *extra_args]


def val_cmd(s: c.Settings) -> list[str]:
    """Unpruned code loss on the validation split: what the lr is chosen by."""
    return c.measure_cmds(s, ["code"])[0]


def grid(s: c.Settings, a) -> tuple[list[c.Run], list[c.Run]]:
    weights = [float(x) for x in a.weights.split(",")]
    bases, runs = [], []
    for seed in s.seeds:
        job = c.base_job(s, sources=[{"path": s.domain(d), "weight": 0.5} for d in DOMAINS], seed=seed,
                         lr=a.base_lr, steps=a.base_steps)
        bases.append(c.Run(f"base_s{seed}", job, after=[val_cmd(s)], group={"seed": seed}))
    for w in weights:
        for lr in s.lrs:
            for seed in s.seeds:
                job = c.base_job(s, sources=[{"path": s.domain("code")}], seed=seed, lr=lr)
                job["init_from"] = rundir.checkpoint_dir(c.run_dir(s, bases[s.seeds.index(seed)]))
                job["training"]["loss_weights"] = {"mi": 0.0}
                job["finetune"] = {"load_concentration_weight": w}
                after = [val_cmd(s), prune_cmd(s, a, rundir.checkpoint_dir("{run}"), "{run}/prune", "--sweep", a.taus)]
                runs.append(c.Run(f"{method(w)}_lr{lr:g}_s{seed}", job, after=after,
                                  group={"method": method(w), "lr": lr, "seed": seed}))
    return bases, runs


def val_row(s: c.Settings, run: c.Run) -> dict | None:
    d = c.run_dir(s, run)
    m = c.read_json(os.path.join(d, "measure.json"))
    sw = c.read_json(os.path.join(d, "prune", "sweep.json"))
    fr = c.read_json(os.path.join(d, "prune", "frequencies.json"))
    if m is None or sw is None or fr is None:
        return None
    r = dict(run.group)
    r["val_log_ppl"] = m["domains"]["code"]["loss"]
    r["val_ppl"] = math.exp(r["val_log_ppl"])
    r["ppl"] = sw["unpruned"]["ppl"]
    r["H_m_sum"] = sum(v["H_m"] for v in fr.values())
    for p in sw["rows"]:
        r[f"kept@{p['tau']:g}"] = 100.0 * p["params_kept"]
        r[f"ppl@{p['tau']:g}"] = p["ppl"]
    return r


def matched_runs(s: c.Settings, a, runs: list[c.Run], best: dict) -> list[c.Run]:
    """Measurement-only runs: for every seed and weight w > 0 at its chosen lr, the plain fine-tune (w = 0 at
    its chosen lr) pruned to w's per-layer counts at each tau, by frequency and by REAP; and w's own model
    pruned to its counts by REAP. The taus are in the name: other taus, other counts, other runs."""
    by = {(r.group["method"], r.group["lr"], r.group["seed"]): r for r in runs}
    tag = "taus" + a.taus.replace(",", "_")
    out = []
    plain = method(0.0)
    for (m, lr, seed), r in sorted(by.items(), key=lambda kv: str(kv[0])):
        if m == plain or lr != best.get(m) or (plain, best.get(plain), seed) not in by:
            continue
        conc_dir = c.run_dir(s, r)
        plain_dir = c.run_dir(s, by[(plain, best[plain], seed)])
        sweep = os.path.join(conc_dir, "prune", "sweep.json")
        after = [prune_cmd(s, a, rundir.checkpoint_dir(plain_dir), "{run}/plain_" + crit, "--match", sweep,
                           "--criterion", crit) for crit in CRITERIA]
        after.append(prune_cmd(s, a, rundir.checkpoint_dir(conc_dir), "{run}/conc_reap", "--match", sweep,
                               "--criterion", "reap"))
        out.append(c.Run(f"match_{m}_s{seed}_{tag}", None, after=after,
                         group={"method": m, "lr": lr, "plain_lr": best[plain], "seed": seed}))
    return out


def matched_rows(s: c.Settings, mruns: list[c.Run], taus: list[float]) -> list[dict]:
    rows = []
    for run in mruns:
        d = c.run_dir(s, run)
        got = {k: c.read_json(os.path.join(d, k, "match.json")) for k in ("plain_frequency", "plain_reap", "conc_reap")}
        if any(v is None for v in got.values()):
            continue
        for i, t in enumerate(taus):
            conc = got["plain_frequency"]["rows"][i]
            rows.append({**run.group, "tau": t, "kept": 100.0 * conc["matched_params_kept"],
                         "conc_freq": conc["matched_ppl"], "conc_reap": got["conc_reap"]["rows"][i]["ppl"],
                         "plain_freq": got["plain_frequency"]["rows"][i]["ppl"],
                         "plain_reap": got["plain_reap"]["rows"][i]["ppl"],
                         "plain_kept": 100.0 * got["plain_frequency"]["rows"][i]["params_kept"],
                         "counts": [conc["att_experts_per_layer"], conc["mlp_experts_per_layer"]]})
    return rows


MATCH_COLS = [("kept", "% params kept", 1), ("conc_freq", "concentrated, by frequency", 2),
              ("conc_reap", "concentrated, by REAP", 2), ("plain_freq", "plain, same counts, by frequency", 2),
              ("plain_reap", "plain, same counts, by REAP", 2)]


def matched_table(rows: list[dict], order: list[str], taus: list[float]) -> str:
    head = ["fine-tune", "τ", "seeds"] + [h for _, h, _ in MATCH_COLS]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    for m in order:
        for t in taus:
            rs = [r for r in rows if r["method"] == m and r["tau"] == t]
            if rs:
                lines.append("| " + " | ".join([m, f"{t:g}", str(len(rs))]
                                               + [c.fmt(c.mean_std([r[k] for r in rs]), dg) for k, _, dg in MATCH_COLS]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    s, a = c.parse("s4_prune", __doc__, lrs="3e-3,1e-2", steps=150, argv=argv, extra=extra)
    try:
        weights = [float(x) for x in a.weights.split(",")]
        taus = [float(x) for x in a.taus.split(",")]
    except ValueError:
        raise c.ConfigError(f"--weights {a.weights!r} / --taus {a.taus!r}: expected comma-separated numbers") from None
    if 0.0 not in weights:
        raise c.ConfigError(f"--weights {a.weights}: include 0 (the plain fine-tune every weight is compared with)")
    c.check_inputs(s, DOMAINS)
    t0 = time.time()
    bases, runs = grid(s, a)
    status = c.execute(s, [bases, runs], report_only=a.report_only)
    rows = [r for r in (val_row(s, run) for run in runs) if r is not None]
    cols = [("ppl", "code ppl (test), unpruned", 2), ("H_m_sum", "Σ H(m)", 2)]
    for t in taus:
        cols += [(f"kept@{t:g}", f"τ={t:g}: % params kept", 1), (f"ppl@{t:g}", f"τ={t:g}: ppl", 2)]
    order = [method(w) for w in weights]
    agg = c.aggregate(rows, [k for k, _, _ in cols] + ["val_log_ppl", "val_ppl"], select="val_log_ppl")
    best = {m: v["best_lr"] for m, v in agg.items()}
    mruns = matched_runs(s, a, runs, best)
    if all(status.get(r.name, c.is_done(s, r)) for r in runs) or a.report_only:
        c.execute(s, [mruns], report_only=a.report_only)
    mrows = matched_rows(s, mruns, taus)
    brows = [r for r in (val_row(s, b) for b in bases) if r is not None]
    total = c.add_wall(s, time.time() - t0)
    vcols = [("val_ppl", "code ppl (validation: selects the lr)", 2)] + cols
    body = (f"{len(rows)}/{len(runs)} fine-tunes finished, {len({(r['method'], r['seed']) for r in mrows})}/"
            f"{len(mruns)} matched prunings. Each weight at the lr with the lowest mean validation perplexity; every "
            "other number is on the test split:\n\n" + c.markdown(agg, vcols, order=order, all_lrs=False)
            + "\n\nEqual size: each concentrated fine-tune (at its lr) pruned at τ, and the plain fine-tune of the same "
              "seed (at its lr) pruned to exactly the same per-layer expert counts; test perplexity:\n\n"
            + matched_table(mrows, order, taus)
            + "\n\nEvery lr:\n\n" + c.markdown(agg, vcols, order=order, all_lrs=True))
    png = c.plot(agg, "ppl", "code perplexity (test), unpruned", os.path.join(s.out, "s4.png"), order,
                 "S4: fine-tuning with load concentration")
    body += f"\n\nPlot: {os.path.basename(png) if png else '(matplotlib missing: no plot)'}"
    c.write_report(s, "S4: load concentration, then pruning, at matched size", body,
                   {"aggregate": agg, "rows": rows, "bases": brows, "matched": mrows}, total)
    return 0 if len(rows) == len(runs) and len(mrows) == len(mruns) * len(taus) else 1


if __name__ == "__main__":
    cli.run(main)
