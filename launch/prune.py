"""Prune the experts a task does not use: frequencies on task data -> keep f/max >= tau -> checkpoint.

One process (CPU):
    python launch/prune.py --checkpoint runs/ft-code-conc/checkpoints --data data/embedded/shards/code \\
        --tau 0.1 --out runs/pruned
Sweep tau (table, sweep.csv and sweep.png of parameters kept vs task perplexity; --tau also writes that one):
    python launch/prune.py --checkpoint CKPT --data SHARDS --sweep 0.001,0.01,0.1,0.3 --out runs/sweep
Prune to the per-layer expert counts of another pruning (matched size; every row of its sweep.json, or its
prune.json), keeping the experts with the highest score (--criterion frequency, or reap: router-weighted
activation, arXiv 2510.13999; one process):
    python launch/prune.py --checkpoint CKPT --data SHARDS --match runs/other/sweep.json --criterion reap --out DIR
Perplexity is measured on the job's validation split (--split val, the default) or test split (--split test),
held out as the checkpoint's job holds it out (data.val_fraction, data.test_fraction, data.split_by; override
with --val-fraction, --test-fraction, --split-by).
Several ranks (each routes 1/N of every global batch; counts are SUM-all-reduced, so the result equals
one process; rank 0 writes):
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launch/prune.py --checkpoint CKPT --data SHARDS --tau 0.1 --out DIR
    mpirun -np 2 python launch/prune.py ...

--checkpoint: a trainer checkpoint directory (newest complete tag), a step_NNNNNNNN tag, or a Hugging Face
ModuleFormer directory (config.json). Writes under --out: checkpoints/<tag>/ (weights-only trainer
layout; use it as a job's init_from, with the model section from its job.yaml), hf/ (the Hugging Face
export of launch/export.py: per-layer counts, loads with trust_remote_code; in IBM's code too when every
layer kept the same counts), frequencies.json (per
sub-layer f_m, f_m / max and the monitor's load statistics), prune.json (what was kept, perplexities).
"""

from __future__ import annotations

import json
import os
import sys

if not __package__:  # run as a script from the checkout (installed, it is molm_ds.launch)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from molm_ds import cli  # noqa: E402


def parse_args(argv=None):
    p = cli.ArgumentParser(prog="launch/prune.py", description=__doc__.split("\n")[0], epilog=__doc__)
    p.add_argument("--checkpoint", required=True, help="trainer checkpoint dir / tag, or a HF ModuleFormer dir")
    p.add_argument("--data", required=True, nargs="+", help="task shard directories (or Megatron prefixes)")
    p.add_argument("--tau", type=float, default=None, help="prune threshold on f_m / max f (writes the checkpoint)")
    p.add_argument("--sweep", default=None, help="comma-separated taus: table + sweep.png (no checkpoints)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--batches", type=int, default=32, help="global batches routed to count expert use")
    p.add_argument("--eval-batches", type=int, default=16, help="global validation batches for perplexity")
    p.add_argument("--batch-size", type=int, default=8, help="global batch (sequences), split over ranks")
    p.add_argument("--seq-len", type=int, default=None, help="default: the checkpoint job's data.seq_len, else 128")
    p.add_argument("--seed", type=int, default=1234, help="order of the counting windows")
    p.add_argument("--split", choices=("val", "test"), default="val", help="held-out split scored for perplexity")
    p.add_argument("--val-fraction", type=float, default=None, help="default: the checkpoint job's data.val_fraction")
    p.add_argument("--test-fraction", type=float, default=None, help="default: the checkpoint job's data.test_fraction")
    p.add_argument("--split-by", choices=("position", "document", "auto"), default=None,
                   help="default: the checkpoint job's data.split_by")
    p.add_argument("--criterion", choices=("frequency", "reap"), default="frequency",
                   help="expert score for --match (tau thresholds are always on frequency)")
    p.add_argument("--match", default=None, metavar="JSON",
                   help="a sweep.json / prune.json of another pruning: prune to each of its per-layer expert counts "
                        "(writes match.json)")
    p.add_argument("--no-hf", action="store_true", help="do not write the Hugging Face export")
    p.add_argument("--local_rank", type=int, default=None, help=cli.SUPPRESS)
    args = p.parse_args(argv)
    if args.tau is None and args.sweep is None and args.match is None:
        p.error("give --tau T (prune and write a checkpoint), --sweep T1,T2,... (compare) and/or --match JSON")
    if args.match is not None and not os.path.isfile(args.match):
        p.error(f"--match {args.match}: no such file; give the sweep.json or prune.json of an earlier pruning")
    try:
        args.taus = [float(t) for t in args.sweep.split(",")] if args.sweep else []
    except ValueError:
        p.error(f"--sweep {args.sweep!r}: give comma-separated numbers, e.g. --sweep 0.01,0.1,0.3")
    for tau in args.taus + ([args.tau] if args.tau is not None else []):
        if not 0.0 <= tau <= 1.0:
            p.error(f"tau {tau:g} must be in [0, 1] (a fraction of the most used expert's frequency)")
    for name in ("batches", "eval_batches", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def plot_sweep(rows: list[dict], base: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r["params_kept"] for r in rows], [r["ppl"] for r in rows], "o-")
    labels: dict[tuple, list[str]] = {}  # taus that give the same model share one label
    for r in rows:
        labels.setdefault((r["params_kept"], r["ppl"]), []).append(f"{r['tau']:g}")
    for (x, y), taus in labels.items():
        ax.annotate("τ=" + ",".join(taus), (x, y), textcoords="offset points", xytext=(-10, 6), fontsize=8, ha="right")
    ax.plot([1.0], [base["ppl"]], "k*", label="unpruned")
    ax.set_xlabel("parameters kept (fraction)")
    ax.set_ylabel("task perplexity")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from molm_ds.data import DataSource, MixtureLoader
    from molm_ds import rundir
    from molm_ds.checkpoint import tag_for
    from molm_ds.errors import ConfigError, DataError
    from molm_ds.loading import load_source
    from molm_ds.log import print0, setup_logging
    from molm_ds.monitor import load_stats
    from molm_ds.storage import atomic_write_text
    from molm_ds.prune import (
        expert_load_sums, experts_to_keep, normalized_frequencies, activation_frequencies, param_count,
        perplexity, prune_model, save_pruned_checkpoint,
    )
    from molm_ds.train.distributed import launcher_kind

    setup_logging()
    rank, world = 0, 1
    if launcher_kind() != "single":
        from molm_ds.train.distributed import init_distributed

        rank, world = init_distributed()
    if args.batch_size % world:
        raise ConfigError(f"--batch-size {args.batch_size} must be divisible by the {world} ranks")
    for p in args.data:
        if not os.path.exists(p) and not os.path.exists(p + ".idx"):
            raise DataError(f"--data {p} does not exist: give shard directories (python -m data_prep.build_shards --out DIR)")
    taus = args.taus

    torch.manual_seed(0)
    # bf16/fp16 runs: the fp32 master weights, so the pruned checkpoint and export keep full precision
    src = load_source(args.checkpoint)
    model, job = src.model, src.job
    tag = os.path.basename(src.where) if src.kind == "checkpoint" else tag_for(0)
    seq_len = args.seq_len or (job.get("data") or {}).get("seq_len") or 128
    data = job.get("data") or {}
    split_kw = dict(val_fraction=args.val_fraction if args.val_fraction is not None else data.get("val_fraction", 0.01),
                    test_fraction=args.test_fraction if args.test_fraction is not None else data.get("test_fraction", 0.0),
                    split_by=args.split_by or data.get("split_by", "position"))
    if args.split == "test" and split_kw["test_fraction"] <= 0:
        raise ConfigError("--split test: the test fraction is 0 (the checkpoint's job has no data.test_fraction); "
                          "pass --test-fraction F")
    kw = dict(sources=[DataSource(p) for p in args.data], seq_len=seq_len, micro_batch_size=args.batch_size // world,
              seed=args.seed, dp_rank=rank, dp_world_size=world, **split_kw)
    train = MixtureLoader(split="train", **kw)
    held = MixtureLoader(split=args.split, **kw)
    distinct = sum(len(w) for w in held.windows)
    if args.eval_batches * args.batch_size > distinct:
        print0(f"warning: --eval-batches {args.eval_batches} x --batch-size {args.batch_size} windows is more than the "
               f"{distinct} distinct {args.split} windows, so some are scored more than once; lower --eval-batches")
    val_batches = [held.next_batch() for _ in range(args.eval_batches)]
    scored = {"split": args.split, **split_kw, "windows": args.eval_batches * args.batch_size,
              "tokens": args.eval_batches * args.batch_size * seq_len, "distinct_windows": distinct}

    sums = expert_load_sums(model, (train.next_batch() for _ in range(args.batches)))
    # --match alone compares pruned models only: the unpruned perplexity is not needed (and costs one evaluation)
    match_only = args.match is not None and not taus and args.tau is None
    base = {"params": param_count(model), "ppl": None if match_only else perplexity(model, val_batches),
            "scored": scored}
    print0(f"unpruned: {base['params']:,} parameters, task perplexity "
           f"{'not measured (--match only)' if match_only else format(base['ppl'], '.3f')} "
           f"({args.batches} x {args.batch_size} x {seq_len} tokens counted on {world} rank(s))")

    def run(tau: float, keep=None):
        keep = experts_to_keep(sums, tau=tau) if keep is None else keep
        pruned = prune_model(model, keep)
        n = param_count(pruned)
        return pruned, keep, {"tau": tau, "params": n, "params_kept": n / base["params"],
                              "ppl": perplexity(pruned, val_batches),
                              "experts_kept": sum(len(v) for v in keep.values()),
                              "att_experts_per_layer": list(pruned.config.att_experts_per_layer),
                              "mlp_experts_per_layer": list(pruned.config.mlp_experts_per_layer)}

    os.makedirs(args.out, exist_ok=True)
    freqs, nfreqs = activation_frequencies(sums), normalized_frequencies(sums)
    if rank == 0:
        frequencies = {k.tag: {"f": freqs[k].tolist(), "f_over_max": nfreqs[k].tolist(), **load_stats(sums[k])}
                       for k in sorted(sums)}
        atomic_write_text(os.path.join(args.out, rundir.FREQUENCIES_JSON), json.dumps(frequencies, indent=1),
                          what="report")

    total_experts = sum(s.num_experts for s in sums.values())
    if taus:
        rows = [run(t)[2] for t in taus]
        if rank == 0:
            print(f"{'tau':>8} {'experts':>9} {'params':>10} {'kept':>7} {'task ppl':>9}   attn/layer  mlp/layer")
            print(f"{'-':>8} {total_experts:>9} {base['params']:>10,} {1.0:>7.1%} {base['ppl']:>9.3f}")
            for r in rows:
                print(f"{r['tau']:>8g} {r['experts_kept']:>9} {r['params']:>10,} {r['params_kept']:>7.1%} {r['ppl']:>9.3f}"
                      f"   {r['att_experts_per_layer']}  {r['mlp_experts_per_layer']}")
            atomic_write_text(os.path.join(args.out, rundir.SWEEP_JSON),
                              json.dumps({"unpruned": base, "rows": rows}, indent=1), what="report")
            plot_sweep(rows, base, os.path.join(args.out, rundir.SWEEP_PNG))
            print(f"wrote {os.path.join(args.out, rundir.SWEEP_PNG)} and {rundir.SWEEP_JSON}")

    if args.match is not None:
        if world > 1:
            raise ConfigError("--match runs in one process (the REAP score is not all-reduced); drop the launcher")
        from molm_ds.monitor import SubLayer
        from molm_ds.prune import experts_to_keep_count, reap_scores

        with open(args.match) as f:
            other = json.load(f)
        targets = other.get("rows") or [other]
        if args.criterion == "reap":
            counting = MixtureLoader(split="train", **kw)  # the windows the frequencies were counted on
            scores = reap_scores(model, (counting.next_batch() for _ in range(args.batches)))
        else:
            scores = freqs
        mrows = []
        for t in targets:
            counts = {**{SubLayer(i, "attn"): n for i, n in enumerate(t["att_experts_per_layer"])},
                      **{SubLayer(i, "mlp"): n for i, n in enumerate(t["mlp_experts_per_layer"])}}
            keep = experts_to_keep_count(scores, counts)
            row = run(t.get("tau", float("nan")), keep)[2]
            mrows.append({**row, "criterion": args.criterion, "matched_params_kept": t.get("params_kept"),
                          "matched_ppl": t.get("ppl"), "kept_ids": {k.tag: v for k, v in sorted(keep.items())}})
        match = {"unpruned": base, "criterion": args.criterion, "match": os.path.abspath(args.match),
                 "scores": {k.tag: v.tolist() for k, v in sorted(scores.items())}, "rows": mrows}
        atomic_write_text(os.path.join(args.out, "match.json"), json.dumps(match, indent=1), what="report")
        for r in mrows:
            print(f"matched {r['att_experts_per_layer']} / {r['mlp_experts_per_layer']} by {args.criterion}: "
                  f"{r['params_kept']:.1%} kept, ppl {r['ppl']:.3f} (the matched model: {r['matched_ppl']})")

    if args.tau is not None:
        pruned, keep, row = run(args.tau)
        if rank == 0:
            info = {"source": os.path.abspath(args.checkpoint), "data": args.data, "unpruned": base, **row,
                    "kept_ids": {k.tag: v for k, v in sorted(keep.items())}}
            d = save_pruned_checkpoint(pruned, job, rundir.checkpoint_dir(args.out), tag=tag, info=info)
            if not args.no_hf:
                from molm_ds.hf import export_hf
                from molm_ds.tokenizer import find_run_tokenizer

                hf = export_hf(pruned, os.path.join(args.out, rundir.HF), tokenizer=find_run_tokenizer(job),
                               context_length=seq_len, source=d, replace=True)
                print(f"wrote {os.path.join(args.out, rundir.HF)} (model_type {hf['model_type']}"
                      f"{'' if hf['tokenizer'] else ', no tokenizer: its data manifests name none'})")
            atomic_write_text(os.path.join(args.out, rundir.PRUNE_JSON), json.dumps(info, indent=1), what="report")
            print(f"tau {args.tau:g}: kept {row['experts_kept']}/{total_experts} experts, {row['params']:,} parameters "
                  f"({row['params_kept']:.1%}), task perplexity {base['ppl']:.3f} -> {row['ppl']:.3f}; wrote {d}")
    from molm_ds.parallel import comm

    comm.barrier()
    return 0


def entry() -> None:
    cli.run(main)


if __name__ == "__main__":
    entry()
