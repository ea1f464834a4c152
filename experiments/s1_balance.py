"""S1: the MI load-balance loss against Switch's balance loss and no balance loss.

    python -m experiments.s1_balance --out runs/science/s1 [--data data/science] [--seeds 1,2,3]
        [--lrs 3e-3,1e-2,3e-2] [--steps 300] [--weight 0.01] [--jobs 2]
        [--bias-rates 1e-4,1e-3,1e-2] [--bias-lr 1e-2] [--methods none,switch,mi,bias]

Paper (ModuleFormer, arXiv 2306.04640): the mutual-information loss L_MI = H(m|x) - H(m) balances the
experts' load (high H(m)) while making each token's routing confident (low H(m|x)). Grid: tiny preset
from scratch on prose + code 50/50, every method at every lr and seed; each method is reported at its
own best lr (lowest mean validation loss over seeds); everything in the tables is measured on the test
split (whole documents held out, never used to choose anything). Routing is measured on those windows:
H(m|x)/log E (lower = sharper), H(m)/log E (1 = the mean routing probabilities are uniform: what
the MI loss maximises), max/mean token count per expert (1 = perfectly balanced), both the mean
over the 4 MoE sub-layers and the 2 domains.

The fourth method, ``bias``, is auxiliary-loss-free balancing (DeepSeek-V3; ``router_balance: bias``, no aux
loss at all): it has its own knob, the bias update rate, so it sweeps ``--bias-rates`` at one lr
(``--bias-lr``, default 1e-2: the best lr of every other method in docs/science.md) over the same seeds, and
is reported at its best rate (lowest mean validation loss), beside its full rate sweep. ``--bias-rates ''``
leaves it out. ``--methods`` trains only some methods (the tables show what the grid directory holds for
those), e.g. ``--methods none,bias`` to add the bias method to a finished grid and check ``none`` again.
"""

from __future__ import annotations

import os
import time

from experiments.science import common as c
from molm_ds import cli, rundir
from molm_ds.errors import ConfigError

METHODS = ("none", "switch", "mi")
BIAS = "bias"
DOMAINS = ("prose", "code")


def extra(p):
    p.add_argument("--weight", type=float, default=0.01, help="weight of the MI / Switch loss")
    p.add_argument("--bias-rates", default="1e-4,1e-3,1e-2",
                   help="comma-separated update rates of the aux-loss-free bias method ('' = leave it out)")
    p.add_argument("--bias-lr", type=float, default=1e-2, help="peak lr of the bias method's runs")
    p.add_argument("--methods", default=",".join(METHODS + (BIAS,)),
                   help="comma-separated methods to run and report (none, switch, mi, bias)")


def methods(text: str) -> tuple[str, ...]:
    chosen = tuple(m.strip() for m in text.split(",") if m.strip())
    bad = [m for m in chosen if m not in METHODS + (BIAS,)]
    if bad or not chosen:
        raise ConfigError(f"--methods {text!r}: choose from {', '.join(METHODS + (BIAS,))}")
    return chosen


def bias_rates(text: str) -> list[float]:
    try:
        rates = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--bias-rates {text!r}: expected comma-separated numbers (e.g. 1e-4,1e-3,1e-2)") from None
    if any(r <= 0 for r in rates):
        raise ConfigError(f"--bias-rates {text!r}: every rate must be > 0")
    return rates


def runs(s: c.Settings, weight: float, rates: list[float] = (), bias_lr: float = 1e-2,
         chosen: tuple[str, ...] = METHODS + (BIAS,)) -> list[c.Run]:
    out = []
    sources = [{"path": s.domain(d), "weight": 0.5} for d in DOMAINS]
    for method in (m for m in METHODS if m in chosen):
        w = {"mi": 0.0, "switch": 0.0, "z": 0.0, "load_concentration": 0.0}
        if method != "none":
            w[method] = weight
        for lr in s.lrs:
            for seed in s.seeds:
                job = c.base_job(s, sources=sources, seed=seed, lr=lr)
                job["training"]["loss_weights"] = w
                out.append(c.Run(f"{method}_lr{lr:g}_s{seed}", job, after=c.measure_cmds(s, DOMAINS),
                                 group={"method": method, "lr": lr, "seed": seed}))
    for rate in (rates if BIAS in chosen else ()):  # no aux loss: the bias alone balances
        for seed in s.seeds:
            job = c.base_job(s, sources=sources, seed=seed, lr=bias_lr)
            job["training"]["loss_weights"] = {"mi": 0.0, "switch": 0.0, "z": 0.0, "load_concentration": 0.0}
            job["model"].setdefault("overrides", {}).update(router_balance="bias", router_bias_rate=rate)
            out.append(c.Run(f"{BIAS}_rate{rate:g}_lr{bias_lr:g}_s{seed}", job, after=c.measure_cmds(s, DOMAINS),
                             group={"method": BIAS, "lr": bias_lr, "rate": rate, "seed": seed}))
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
    r["train_loss"] = c.last_metrics(os.path.join(c.run_dir(s, run), rundir.METRICS)).get("lm_loss")
    return r


COLUMNS = [("val_loss", "val loss (selects the lr)", 3), ("test_loss", "test loss (prose+code)", 3), ("H_rel", "H(m|x)/log E", 3), ("H_rel_mlp", "… MLP only", 3),
           ("H_m_rel", "H(m)/log E per domain", 3), ("max_mean", "max/mean load per domain", 2),
           ("max_mean_mlp", "… MLP only", 2), ("pooled_H_m_rel", "H(m)/log E, domains pooled", 3),
           ("pooled_max_mean", "max/mean, pooled", 2), ("pooled_max_mean_mlp", "… MLP only", 2)]


def main(argv=None) -> int:
    s, a = c.parse("s1_balance", __doc__, lrs="3e-3,1e-2,3e-2", steps=300, argv=argv, extra=extra)
    rates, chosen = bias_rates(a.bias_rates), methods(a.methods)
    for k in ("bias_rates", "bias_lr", "methods"):  # like --lrs: in the run names, so a grid may grow by them
        s.extra.pop(k)
    c.check_inputs(s, DOMAINS)
    t0 = time.time()
    grid = runs(s, a.weight, rates, a.bias_lr, chosen)
    c.execute(s, [grid], report_only=a.report_only)
    rows = [r for r in (row(s, run) for run in grid) if r is not None]
    metrics = [k for k, _, _ in COLUMNS] + ["train_loss"]
    agg = c.aggregate([r for r in rows if r["method"] != BIAS], metrics, select="val_loss")
    order = tuple(m for m in METHODS if m in chosen) + ((BIAS,) if rates and BIAS in chosen else ())
    # the bias method's sweep is over its rate (at one lr): aggregate by rate, put its best rate in the main table
    by_rate = c.aggregate([dict(r, lr=r["rate"]) for r in rows if r["method"] == BIAS], metrics, select="val_loss")
    if BIAS in by_rate:
        best_rate = by_rate[BIAS]["best_lr"]
        agg[BIAS] = {"best_lr": a.bias_lr, "best_rate": best_rate, "per_lr": {a.bias_lr: by_rate[BIAS]["per_lr"][best_rate]},
                     "per_rate": by_rate[BIAS]["per_lr"]}
    total = c.add_wall(s, time.time() - t0)
    body = (f"{len(rows)}/{len(grid)} runs finished. Each method at its best lr (lowest mean val loss)"
            + (f"; bias (no aux loss) at lr {a.bias_lr:g} and its best update rate"
               f" {agg[BIAS]['best_rate']:g}" if BIAS in agg else "") + ":\n\n"
            + c.markdown(agg, COLUMNS, order=order, all_lrs=False)
            + "\n\nEvery lr:\n\n" + c.markdown(agg, COLUMNS, order=[m for m in order if m != BIAS], all_lrs=True))
    if BIAS in by_rate:
        table = c.markdown(by_rate, COLUMNS, order=(BIAS,), all_lrs=True).replace("| method | lr |", "| method | rate |", 1)
        body += f"\n\nBias method, every update rate (lr {a.bias_lr:g}):\n\n" + table
    png = c.plot(agg, "pooled_max_mean", "max/mean expert load (test, domains pooled)", os.path.join(s.out, "s1.png"), order,
                 f"S1: load balance, weight {a.weight:g}")
    c.plot(agg, "test_loss", "test loss", os.path.join(s.out, "s1_test.png"), order, "S1: test loss")
    body += f"\n\nPlots: {os.path.basename(png) if png else '(matplotlib missing: no plot)'}, s1_test.png"
    c.write_report(s, f"S1: MI vs Switch load balance (weight {a.weight:g})", body,
                   {"aggregate": agg, "rows": rows}, total)
    return 0 if len(rows) == len(grid) else 1


if __name__ == "__main__":
    cli.run(main)
