"""Print a probe run (experiments/router/probe.py --out FILE) as a table per sub-layer over steps.

    python experiments/router/show.py /tmp/probe/base.jsonl [--cols H_rel,g_lm,g_mi,dead,z_mean,pos_frac]
    python experiments/router/show.py --final A.jsonl B.jsonl ...     # one line per run
    python experiments/router/show.py --step 1 --cols H_rel,g_lm,g_mi A.jsonl ...   # markdown table
"""

from __future__ import annotations

import argparse
import json


def load(path):
    rows = [json.loads(line) for line in open(path)]
    return [r for r in rows if not r.get("summary")], next(r for r in rows if r.get("summary"))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("files", nargs="+")
    p.add_argument("--cols", default="H_rel,g_lm,g_mi,dead,z_mean,pos_frac,expert_rms,out_rms,gate_sum")
    p.add_argument("--final", action="store_true")
    p.add_argument("--step", type=int, default=None, help="one row per run and sub-layer at this logged step")
    a = p.parse_args()
    if a.step is not None:
        cols = a.cols.split(",")
        print("| run | sub-layer | " + " | ".join(cols) + " |")
        print("| --- | --- |" + " --- |" * len(cols))
        for f in a.files:
            rows, _ = load(f)
            r = next(r for r in rows if r["step"] == a.step)
            for sub, d in r["sub"].items():
                print(f"| {f.rsplit('/', 1)[-1].removesuffix('.jsonl')} | {sub} | "
                      + " | ".join(f"{d.get(c, float('nan')):.3g}" for c in cols) + " |")
        return
    if a.final:
        for f in a.files:
            rows, s = load(f)
            h = " ".join(f"{k}={v:.3f}" for k, v in s["final_H_rel"].items())
            print(f"{f}: val {s['val_loss']:.4f} | H/logE {h}")
        return
    cols = a.cols.split(",")
    for f in a.files:
        rows, s = load(f)
        print(f"== {f}  val_loss {s['val_loss']:.4f}")
        for sub in rows[0]["sub"]:
            print(f"-- {sub}")
            print("step  " + " ".join(f"{c:>10}" for c in cols))
            for r in rows:
                d = r["sub"][sub]
                print(f"{r['step']:4d}  " + " ".join(f"{d.get(c, float('nan')):10.4g}" for c in cols))


if __name__ == "__main__":
    main()
