"""S3: continual learning (prose -> code) with new experts against full fine-tuning.

    python -m experiments.s3_continual --out runs/science/s3 [--data data/science] [--seeds 1,2,3]
        [--lrs 3e-4,1e-3,3e-3,1e-2] [--steps 150] [--base-steps 400] [--base-lr 1e-2] [--replay 0.25] [--jobs 2]

Paper (ModuleFormer, arXiv 2306.04640): adding experts for a new domain and training only them (and the
router rows A') learns the domain while forgetting less than fine-tuning the whole model; the router
sends new-domain tokens to the new experts. Grid: per seed one tiny base pretrained on prose
(--base-steps at --base-lr), then --steps on code only (lifelong) with
  full_ft      init_from only: every parameter trains (no new experts);
  replay_ft    the same on code mixed with --replay of prose (old-domain replay), lr re-warmed from 0
               (continual pretraining as in "Continual Pre-training of MoEs: How robust is your router?");
  full_router  +2 attention and +2 MLP experts per layer, new experts + the whole router train;
  new_only     +2/+2 experts, only the new experts and A' train, ||A'||^2 regulariser 0.01;
every group at the same lr (the lr swept; so no method gets a larger router lr than another). Each
method's lr is chosen by its code loss on the validation split; reported on the test split: prose loss after (forgetting; before = the base), code loss
after, and the mean router probability mass on the new experts for prose and for code tokens
(measure.py on the test windows; continual_report.json holds the trainer's own before/after), the base's
router specialisation, and the learning-vs-forgetting frontier (s3_tradeoff.png, every method and lr).
--bases-only trains and measures the bases alone: how their routers specialise, by domain and by token.
"""

from __future__ import annotations

import os
import time

from experiments.s1_balance import DOMAINS
from experiments.science import common as c
from molm_ds import cli, rundir

# replay_ft: the field's continual-pretraining baseline ("Continual Pre-training of MoEs: How robust is your
# router?", TMLR 2025): every parameter trains on new-domain data mixed with --replay of old-domain data,
# the lr re-warmed from 0 (base_job's linear warmup over steps/20, then cosine decay).
METHODS = ("full_ft", "replay_ft", "full_router", "new_only")


def extra(p):
    p.add_argument("--base-steps", type=int, default=400, help="prose pretraining steps of the base models")
    p.add_argument("--base-lr", type=float, default=1e-2, help="lr of the base models (tiny's demo lr)")
    p.add_argument("--replay", type=float, default=0.25, help="share of old-domain (prose) windows in replay_ft")
    p.add_argument("--bases-only", action="store_true",
                   help="train and measure the base models only (router specialisation by domain and by token)")


def grid(s: c.Settings, base_steps: int, base_lr: float, replay: float = 0.25,
         bases_only: bool = False) -> tuple[list[c.Run], list[c.Run]]:
    bases, runs = [], []
    for seed in s.seeds:
        job = c.base_job(s, sources=[{"path": s.domain("prose")}], seed=seed, lr=base_lr, steps=base_steps)
        bases.append(c.Run(f"base_s{seed}", job, after=c.measure_cmds(s, DOMAINS), group={"seed": seed}))
    for method in () if bases_only else METHODS:
        for lr in s.lrs:
            for seed in s.seeds:
                sources = [{"path": s.domain("code")}]
                if method == "replay_ft":
                    sources = [{"path": s.domain("code"), "weight": 1.0 - replay},
                               {"path": s.domain("prose"), "weight": replay}]
                job = c.base_job(s, sources=sources, seed=seed, lr=lr)
                job["init_from"] = rundir.checkpoint_dir(c.run_dir(s, bases[s.seeds.index(seed)]))
                old = None
                if method not in ("full_ft", "replay_ft"):
                    old = "4,4"
                    job["continual"] = {
                        "attention": 2, "mlp": 2, "strategy": method,
                        "router_reg_weight": 0.01 if method == "new_only" else 0.0,
                        "lr": {"new_experts": lr, "router": lr},
                        "eval": {"old": [s.domain("prose")], "new": [s.domain("code")]}}
                runs.append(c.Run(f"{method}_lr{lr:g}_s{seed}", job, after=c.measure_cmds(s, DOMAINS, old),
                                  group={"method": method, "lr": lr, "seed": seed}))
    return bases, runs


def specialisation(m: dict) -> float:
    """How differently the router treats the two domains: total variation between the mean routing
    distributions p(m) on prose and on code, averaged over sub-layers (0 = the same experts for both)."""
    tags = list(m["domains"]["prose"]["sublayers"])
    tv = [0.5 * sum(abs(a - b) for a, b in zip(m["domains"]["prose"]["sublayers"][t]["p_mean"],
                                                m["domains"]["code"]["sublayers"][t]["p_mean"])) for t in tags]
    return sum(tv) / len(tv)


def token_routing(m: dict) -> tuple[float, float]:
    """How the router treats single tokens, over both domains and every sub-layer: (H(m|x) / log E, the mean
    entropy of a token's routing: 0 = each token to one expert; H(m) / log E, the entropy of the mean
    routing: 1 = every expert used evenly). Low and high together: the experts split the tokens between
    them, each token to its own few (their difference is the mutual information I(x; m) / log E)."""
    h_x = [c.sublayer_mean(m, d, "H_m_given_x_rel") for d in DOMAINS]
    h = [c.sublayer_mean(m, d, "H_m_rel") for d in DOMAINS]
    return sum(h_x) / len(h_x), sum(h) / len(h)


def base_summary(bases: list[dict], base_steps: int, base_lr: float) -> str:
    pm = c.mean_std([b["domains"]["prose"]["loss"] for b in bases])
    cm = c.mean_std([b["domains"]["code"]["loss"] for b in bases])
    sp = c.mean_std([specialisation(b) for b in bases])
    routing = [token_routing(b) for b in bases]  # (H(m|x)/log E, H(m)/log E) per base
    hx = c.mean_std([r[0] for r in routing])
    h = c.mean_std([r[1] for r in routing])
    mi = c.mean_std([r[1] - r[0] for r in routing])
    return (f"Base models ({len(bases)} seeds, {base_steps} prose steps at lr {base_lr:g}; test split): prose "
            f"loss {c.fmt(pm)}, code loss {c.fmt(cm)}; router specialisation (total variation between the "
            f"mean routing on prose and on code, 0 = none) {c.fmt(sp)}. Per token: routing entropy "
            f"H(m|x)/log E {c.fmt(hx)} (0 = each token to one expert), entropy of the mean routing H(m)/log E "
            f"{c.fmt(h)} (1 = every expert used evenly), mutual information I(x; m)/log E {c.fmt(mi)}.\n\n")


def base_table(bases: list[dict]) -> str:
    """Per sub-layer and domain, mean ± std over the bases: H(m|x)/log E, H(m)/log E, and the total variation
    between the domains' mean routing."""
    tags = list(bases[0]["domains"]["prose"]["sublayers"])
    lines = ["| sub-layer | H(m|x)/log E, prose | code | H(m)/log E, prose | code | total variation prose vs code |",
             "| --- | --- | --- | --- | --- | --- |"]
    for t in tags:
        cell = {(d, k): c.fmt(c.mean_std([b["domains"][d]["sublayers"][t][k] for b in bases]))
                for d in DOMAINS for k in ("H_m_given_x_rel", "H_m_rel")}
        tv = c.fmt(c.mean_std([0.5 * sum(abs(x - y) for x, y in zip(b["domains"]["prose"]["sublayers"][t]["p_mean"],
                                                                     b["domains"]["code"]["sublayers"][t]["p_mean"]))
                               for b in bases]))
        lines.append(f"| {t} | {cell['prose', 'H_m_given_x_rel']} | {cell['code', 'H_m_given_x_rel']} | "
                     f"{cell['prose', 'H_m_rel']} | {cell['code', 'H_m_rel']} | {tv} |")
    return "\n".join(lines)


def row(s: c.Settings, run: c.Run, base: dict) -> dict | None:
    v = c.read_json(os.path.join(c.run_dir(s, run), "measure.json"))
    m = c.read_json(os.path.join(c.run_dir(s, run), "measure_test.json"))
    if m is None or v is None:
        return None
    r = dict(run.group)
    r["val_code_loss"] = v["domains"]["code"]["loss"]  # chooses the lr
    r["prose_loss"] = m["domains"]["prose"]["loss"]
    r["code_loss"] = m["domains"]["code"]["loss"]
    r["prose_forgetting"] = r["prose_loss"] - base["domains"]["prose"]["loss"]
    if run.group["method"] not in ("full_ft", "replay_ft"):
        for d in DOMAINS:
            for kind in ("attn", "mlp"):
                r[f"{d}_new_mass_{kind}"] = c.sublayer_mean(m, d, "new_mass", kind)
    # The trainer's own measurement (molm_ds.continual.routing, on data.eval_batches = 4 batches per domain):
    # old_* = the prose eval, new_* = the code eval; a cross-check of measure.py's 102k-token numbers.
    rep = c.read_json(os.path.join(c.run_dir(s, run), "continual_report.json"))
    if rep is not None:
        for when in ("before", "after"):
            for k, v in rep.get(when, {}).items():
                if "_new_mass_" in k or "_new_topk_" in k:
                    r[f"trainer_{when}_{k}"] = v
    return r


COLUMNS = [("val_code_loss", "code loss, validation (selects the lr)", 3), ("code_loss", "code loss after (test)", 3), ("prose_loss", "prose loss after", 3),
           ("prose_forgetting", "prose loss − base", 3),
           ("prose_new_mass_attn", "new-expert mass, prose (attn)", 3), ("code_new_mass_attn", "code (attn)", 3),
           ("prose_new_mass_mlp", "prose (MLP)", 3), ("code_new_mass_mlp", "code (MLP)", 3)]


def tradeoff_plot(agg: dict, path: str) -> str | None:
    """Prose loss (forgetting) against code loss (learning) for every method and lr: the best lr by code
    loss alone can hide a method that learns a little less and forgets much less."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for method in METHODS:
        if method not in agg:
            continue
        lrs = sorted(agg[method]["per_lr"])
        t = [agg[method]["per_lr"][lr] for lr in lrs]
        ax.errorbar([x["code_loss"][0] for x in t], [x["prose_loss"][0] for x in t],
                    xerr=[x["code_loss"][1] for x in t], yerr=[x["prose_loss"][1] for x in t], marker="o",
                    capsize=3, label=method)
        for lr, x in zip(lrs, t):
            ax.annotate(f"{lr:g}", (x["code_loss"][0], x["prose_loss"][0]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.set_xlabel("code loss after (learning; lower is better)")
    ax.set_ylabel("prose loss after (forgetting; lower is better)")
    ax.set_title("S3: learning vs forgetting, labels = lr", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    s, a = c.parse("s3_continual", __doc__, lrs="3e-4,1e-3,3e-3,1e-2", steps=150, argv=argv, extra=extra)
    if not 0.0 < a.replay < 1.0:
        raise c.ConfigError(f"--replay {a.replay}: give the old-domain share in (0, 1), e.g. 0.25")
    c.check_inputs(s, DOMAINS)
    t0 = time.time()
    bases, runs = grid(s, a.base_steps, a.base_lr, a.replay, bases_only=a.bases_only)
    c.execute(s, [bases, runs], report_only=a.report_only)
    base_m = {b.group["seed"]: c.read_json(os.path.join(c.run_dir(s, b), "measure_test.json")) for b in bases}
    if a.bases_only:
        bl = [b for b in base_m.values() if b]
        body = f"{len(bl)}/{len(bases)} base models finished. "
        if bl:
            body += base_summary(bl, a.base_steps, a.base_lr) + "Per sub-layer (mean ± std over seeds):\n\n" + base_table(bl)
        c.write_report(s, "S3: the base models' routers", body, {"bases": base_m}, c.add_wall(s, time.time() - t0))
        return 0 if len(bl) == len(bases) else 1
    rows = [r for r in (row(s, run, base_m[run.group["seed"]]) for run in runs
                        if base_m.get(run.group["seed"]) is not None) if r is not None]
    trainer_keys = sorted({k for r in rows for k in r if k.startswith("trainer_")})
    agg = c.aggregate(rows, [k for k, _, _ in COLUMNS] + trainer_keys, select="val_code_loss")
    total = c.add_wall(s, time.time() - t0)
    bl = [b for b in base_m.values() if b]
    base_line = ""
    if bl:
        base_line = base_summary(bl, a.base_steps, a.base_lr)
        edges = [m for m, v in agg.items() if len(v["per_lr"]) > 1 and v["best_lr"] in (min(v["per_lr"]), max(v["per_lr"]))]
        if edges:
            base_line += f"Best lr at an edge of the sweep (widen --lrs): {', '.join(edges)}.\n\n"
    body = (f"{len(rows)}/{len(runs)} continual runs finished. " + base_line
            + "Each method at its best lr (lowest mean validation code loss); the rest is on the test split:\n\n"
            + c.markdown(agg, COLUMNS, order=METHODS, all_lrs=False)
            + "\n\nEvery lr:\n\n" + c.markdown(agg, COLUMNS, order=METHODS, all_lrs=True))
    tcols = [(k, k.replace("trainer_", "").replace("_new_mass_", " new mass ").replace("_new_topk_", " new top-k "), 3)
             for k in trainer_keys if "_after_" in k]
    if tcols:
        body += ("\n\nThe trainer's own routing share (continual_report.json, 4 eval batches per domain; old = prose, "
                 "new = code), each method at its best lr:\n\n"
                 + c.markdown(agg, tcols, order=[m for m in METHODS if m not in ("full_ft", "replay_ft")], all_lrs=False))
    png = c.plot(agg, "code_loss", "code loss after (held out)", os.path.join(s.out, "s3.png"), METHODS,
                 "S3: learning the new domain")
    c.plot(agg, "prose_loss", "prose loss after (held out)", os.path.join(s.out, "s3_prose.png"), METHODS,
           "S3: forgetting the old domain")
    tradeoff_plot(agg, os.path.join(s.out, "s3_tradeoff.png"))
    body += f"\n\nPlots: {os.path.basename(png) if png else '(matplotlib missing: no plot)'}, s3_prose.png, s3_tradeoff.png"
    c.write_report(s, "S3: continual learning, prose -> code", body,
                   {"aggregate": agg, "rows": rows, "bases": base_m}, total)
    return 0 if len(rows) == len(runs) else 1


if __name__ == "__main__":
    cli.run(main)
