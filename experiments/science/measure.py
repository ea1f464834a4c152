"""Measure a finished run's checkpoint on the held-out windows of each domain: loss and routing.

    python -m experiments.science.measure --checkpoint RUN/checkpoints --data data/science/shards/prose \
        data/science/shards/code --out RUN/measure.json [--split val|test] [--windows 1600] [--old-experts 4,4]

For each --data domain: the first --windows windows (at most: never one twice) of its --split split
(molm_ds.data's fixed split at --val-fraction / --test-fraction, by --split-by, in the order of loader
seed 0, so every run is scored on the same tokens whatever its training seed), cross-entropy (molm_ds.train.evaluate.lm_loss per batch, token
weighted) and, per MoE sub-layer, the monitor's load statistics (molm_ds.monitor.load_stats: H(m|x),
H(m), max/mean token count) from eval-mode routing. With --old-experts A,M (experts per attention /
MLP sub-layer before a continual stage) it also reports the mean router probability mass on the
experts with ids >= A (attention) / >= M (MLP): the share of routing that went to the new experts.
"""

from __future__ import annotations

import json
import math
import os
import sys

from molm_ds import cli
from molm_ds.errors import ConfigError


def parse_args(argv=None):
    p = cli.ArgumentParser(prog="python -m experiments.science.measure", description=__doc__)
    p.add_argument("--checkpoint", required=True, help="trainer checkpoint directory or tag")
    p.add_argument("--data", required=True, nargs="+", help="shard directories, one per domain")
    p.add_argument("--out", required=True, help="JSON output")
    p.add_argument("--windows", type=int, default=1600, help="validation windows per domain (at most)")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--test-fraction", type=float, default=0.0)
    p.add_argument("--split-by", choices=("position", "document", "auto"), default="position")
    p.add_argument("--split", choices=("val", "test"), default="val", help="held-out split scored")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--old-experts", default=None, metavar="A,M", help="experts per sub-layer before a continual stage")
    return p.parse_args(argv)


def domain_name(path: str) -> str:
    return os.path.basename(os.path.normpath(path))


def measure_domain(model, path: str, *, windows: int, seq_len: int, val_fraction: float, batch_size: int,
                   old: dict | None, test_fraction: float = 0.0, split_by: str = "position", split: str = "val") -> dict:
    import torch

    from molm_ds.data import DataSource, MixtureLoader
    from molm_ds.monitor import load_stats
    from molm_ds.monitor.expert_load import ExpertLoadTracker
    from molm_ds.train.evaluate import lm_loss

    val = MixtureLoader([DataSource(path, 1.0)], seq_len=seq_len, micro_batch_size=batch_size, seed=0,
                        split=split, val_fraction=val_fraction, test_fraction=test_fraction, split_by=split_by)
    n = min(windows, sum(len(w) for w in val.windows))
    tracker = ExpertLoadTracker(model, hooks=False)
    loss_sum, tokens = 0.0, 0
    with torch.no_grad():
        for i in range(math.ceil(n / batch_size)):
            b = val.next_batch()
            rows = min(batch_size, n - i * batch_size)  # the last batch is cut so no window counts twice
            ids, labels = b["input_ids"][:rows], b["labels"][:rows]
            out = model(ids)
            tracker.observe()
            t = int((labels != -100).sum())
            loss_sum += float(lm_loss(logits_BTV=out.logits, labels_BT=labels)) * t
            tokens += t
    sums = tracker.reduce(group=None)
    tracker.close()
    sub = {}
    for key in sorted(sums):
        s = sums[key]
        st = load_stats(s)
        E = s.num_experts
        row = {"E": E, "H_m_given_x_rel": st["H_m_given_x"] / math.log(E) if E > 1 else float("nan"),
               "H_m_rel": st["H_m"] / math.log(E) if E > 1 else float("nan"),
               "max_over_mean_load": st["max_over_mean_load"], "dead_experts": st["dead_experts"],
               # raw sums, so domains can be pooled afterwards (the training batches mix them)
               "counts": s.counts_E.tolist(), "p_mean": (s.probs_E / s.tokens).tolist()}
        if old is not None:
            e_old = old[key.kind]
            row["new_mass"] = float(s.probs_E[e_old:].sum() / s.tokens) if E > e_old else 0.0
            row["new_token_share"] = float(s.shares()[e_old:].sum()) if E > e_old else 0.0
        sub[key.tag] = row
    return {"loss": loss_sum / tokens, "ppl": math.exp(loss_sum / tokens), "tokens": tokens, "split": split,
            "split_by": val.split_kinds[0], "distinct_windows": sum(len(w) for w in val.windows), "sublayers": sub}


def main(argv=None) -> int:
    a = parse_args(argv)
    import torch

    from molm_ds.checkpoint import load_model

    old = None
    if a.old_experts is not None:
        try:
            att, mlp = (int(x) for x in a.old_experts.split(","))
        except ValueError:
            raise ConfigError(f"--old-experts {a.old_experts!r}: expected two integers A,M (e.g. 4,4)") from None
        old = {"attn": att, "mlp": mlp}
    torch.manual_seed(0)
    model = load_model(a.checkpoint, what="--checkpoint")
    model.eval()
    if a.split == "test" and a.test_fraction <= 0:
        raise ConfigError("--split test needs --test-fraction > 0 (the fraction the runs were trained with)")
    res = {"checkpoint": a.checkpoint, "windows": a.windows, "seq_len": a.seq_len, "split": a.split,
           "val_fraction": a.val_fraction, "test_fraction": a.test_fraction, "split_by": a.split_by, "domains": {}}
    for path in a.data:
        res["domains"][domain_name(path)] = measure_domain(
            model, path, windows=a.windows, seq_len=a.seq_len, val_fraction=a.val_fraction,
            batch_size=a.batch_size, old=old, test_fraction=a.test_fraction, split_by=a.split_by, split=a.split)
    tmp = a.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(res, f, indent=1)
    os.replace(tmp, a.out)
    print(" | ".join(f"{d}: loss {r['loss']:.4f} ({r['tokens']:,} tokens)" for d, r in res["domains"].items()))
    return 0


if __name__ == "__main__":
    cli.run(main)
