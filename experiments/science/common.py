"""What every claim's grid shares: run specs, launching the real tools, skip-done, aggregation, reports.

A grid is a list of `Run`s in phases (a base model before the runs that start from it). A run is a
directory with the job YAML it trains (`launch/pretrain.py`), then the commands that read its checkpoint
(`experiments.science.measure`, `launch/prune.py`); `result.json` is written last and records the job and
those commands, so a run that has it with the same commands is done and a rerun skips it; a run whose
measurement commands changed (new pruning thresholds, more windows) is measured again from its checkpoint
without training again.

Data splits: every run trains on the corpus's train split (whole documents held out: data.split_by
document, val_fraction 0.1, test_fraction 0.1); every claim chooses its lr on the validation split and
reports the test split. The corpus's content hash (data_prep.science.corpus_sha256) and the producing
commit go into grid.json and results.json; a grid refuses a corpus whose hash differs from the grid's or
from the committed results under docs/science/<claim>/ unless --allow-other-corpus. Runs go `--jobs` at a time, each process with one thread (two threads per
process on a shared 2-core machine spin instead of working). Everything reported is read back from the
files the tools wrote (metrics.jsonl, measure.json, continual_report.json, sweep.json).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import yaml

from molm_ds import cli, rundir
from molm_ds.checkpoint import is_complete, tag_for
from molm_ds.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GRID_FILE = "grid.json"
RESULT = "result.json"
# committed results, one directory per claim (MOLM_DS_SCIENCE_RESULTS points elsewhere: the harness's own
# tests, whose tiny corpora are not the one the committed results were measured on)
PUBLISHED = os.environ.get("MOLM_DS_SCIENCE_RESULTS") or os.path.join(REPO, "docs", "science")
# Settings that change only what is measured on a finished checkpoint, not the training: a run records its
# measurement commands, so these may change between invocations of one --out (the runs are re-measured).
MEASURE_ONLY = ("windows", "taus", "prune_eval_batches", "match_weights")


@dataclass
class Settings:
    """One grid's knobs (all on the command line; stored in grid.json, a rerun must match them)."""

    claim: str
    out: str
    data: str
    seeds: list[int]
    lrs: list[float]
    steps: int
    batch: int
    jobs: int
    windows: int
    seq_len: int = 64
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    split_by: str = "document"
    corpus_sha256: str = ""
    extra: dict = field(default_factory=dict)  # the claim's own options (weights, base steps, ...)

    def fingerprint(self) -> dict:
        d = dict(vars(self))
        d.pop("jobs")  # how many run at once does not change any result
        d.pop("out")
        d["extra"] = {k: v for k, v in self.extra.items() if k not in ("publish", "allow_other_corpus")}
        return d

    def must_match(self) -> dict:
        """The settings every run of one --out shares. Seeds and lrs may grow: runs are named by them, so a
        rerun with a wider sweep adds runs and keeps the finished ones; measurement-only settings may change
        (each run records its measurement commands and is re-measured when they differ)."""
        d = {k: v for k, v in self.fingerprint().items() if k not in ("seeds", "lrs") + MEASURE_ONLY}
        d["extra"] = {k: v for k, v in d["extra"].items() if k not in MEASURE_ONLY}
        return d

    def domain(self, name: str) -> str:
        return os.path.join(self.data, "shards", name)


@dataclass
class Run:
    """One training run and the measurements of its checkpoint."""

    name: str  # directory under out/runs
    job: Optional[dict]  # the job YAML (run_dir and name are filled in); None: no training, only `after`
    after: list[list[str]] = field(default_factory=list)  # commands run after training ({run} = run dir)
    group: dict = field(default_factory=dict)  # method, lr, seed... (what the aggregation groups by)
    reuse: Optional[str] = None  # a finished run of another grid that trained this very job (copied, not rerun)


def parse(claim: str, doc: str, *, lrs: str, steps: int, argv=None, extra: Optional[Callable] = None):
    p = cli.ArgumentParser(prog=f"python -m experiments.{claim}", description=doc)
    p.add_argument("--out", required=True, help="grid directory (created; a rerun skips finished runs)")
    p.add_argument("--data", default="data/science", help="corpus of python -m data_prep.science")
    p.add_argument("--seeds", default="1,2,3", help="comma-separated training seeds")
    p.add_argument("--lrs", default=lrs, help="comma-separated peak learning rates swept for every method")
    p.add_argument("--steps", type=int, default=steps, help="optimizer steps of each run")
    p.add_argument("--batch", type=int, default=8, help="micro-batch (sequences of 64 tokens)")
    p.add_argument("--jobs", type=int, default=2, help="runs at once (one thread each)")
    p.add_argument("--windows", type=int, default=1600, help="held-out windows of 64 tokens scored per domain")
    p.add_argument("--report-only", action="store_true",
                   help="start no run: write the tables from the runs finished so far")
    p.add_argument("--publish", default=None, metavar="DIR",
                   help=f"also copy results.json, results.md and the plots to DIR (the committed ones live in "
                        f"docs/science/<claim>)")
    p.add_argument("--allow-other-corpus", action="store_true",
                   help="run although the corpus's content hash differs from the committed results' (their numbers "
                        "then do not apply to this corpus)")
    if extra is not None:
        extra(p)
    a = p.parse_args(argv)
    try:
        seeds = [int(s) for s in a.seeds.split(",")]
        lr_list = [float(x) for x in a.lrs.split(",")]
    except ValueError:
        raise ConfigError(f"--seeds {a.seeds!r} / --lrs {a.lrs!r}: expected comma-separated numbers") from None
    for name in ("steps", "batch", "jobs", "windows"):
        if getattr(a, name) < 1:
            raise ConfigError(f"--{name} must be at least 1, got {getattr(a, name)}")
    known = {"out", "data", "seeds", "lrs", "steps", "batch", "jobs", "windows", "report_only"}
    s = Settings(claim=claim, out=a.out, data=a.data, seeds=seeds, lrs=lr_list, steps=a.steps, batch=a.batch,
                 jobs=a.jobs, windows=a.windows, extra={k: v for k, v in vars(a).items() if k not in known})
    return s, a


def published_dir(claim: str) -> str:
    return os.path.join(PUBLISHED, claim)


def same_corpus(sha: str) -> set[str]:
    """``sha`` and, when it is the committed corpus's hash (docs/science/corpus.json), the hashes its
    ``earlier_hashes`` records for the same corpus under an earlier definition of the hash."""
    content = (read_json(os.path.join(PUBLISHED, "corpus.json")) or {}).get("content", {})
    return {sha} | (set(content.get("earlier_hashes", {})) if content.get("corpus_sha256") == sha else set())


def check_corpus(s: Settings) -> None:
    """Record the corpus's content hash; refuse one that differs from the committed results' hash."""
    from data_prep.science import corpus_sha256

    s.corpus_sha256 = corpus_sha256(s.data)
    pub = read_json(os.path.join(published_dir(s.claim), "results.json"))
    theirs = (pub or {}).get("corpus_sha256")
    if theirs and theirs not in same_corpus(s.corpus_sha256) and not s.extra.get("allow_other_corpus"):
        raise ConfigError(f"--data {s.data}: corpus sha256 {s.corpus_sha256[:16]}... differs from the one the committed "
                          f"results in {os.path.relpath(published_dir(s.claim), REPO)} were measured on "
                          f"({theirs[:16]}...): this machine's man pages or Python stdlib differ, so its numbers will "
                          "not be those; pass --allow-other-corpus to run anyway")


def check_inputs(s: Settings, domains: Sequence[str]) -> None:
    """Fail before any work: the corpus exists (and is the committed results' unless allowed), --out is this
    grid's directory or new."""
    for d in domains:
        if not os.path.isfile(os.path.join(s.domain(d), "manifest.json")):
            raise ConfigError(f"--data {s.data}: no finished shard directory {s.domain(d)}; build the corpus with "
                              f"python -m data_prep.science --out {s.data}")
    check_corpus(s)
    grid = os.path.join(s.out, GRID_FILE)
    if os.path.isfile(s.out):
        raise ConfigError(f"--out {s.out} is a file; give a directory")
    if os.path.isdir(s.out) and os.listdir(s.out):
        if not os.path.isfile(grid):
            raise ConfigError(f"--out {s.out} exists and holds other files (no {GRID_FILE}); give a new or empty "
                              "directory")
        with open(grid) as f:
            old = json.load(f)
        old = {k: v for k, v in old.items() if k not in ("seeds", "lrs") + MEASURE_ONLY}
        old["extra"] = {k: v for k, v in old.get("extra", {}).items() if k not in MEASURE_ONLY}
        if old != s.must_match():
            diff = ", ".join(f"{k}: {old.get(k)} -> {v}" for k, v in s.must_match().items() if old.get(k) != v)
            raise ConfigError(f"--out {s.out} holds a grid with other settings ({diff}); use another --out or "
                              f"the same settings (only --seeds, --lrs and {', '.join('--' + m.replace('_', '-') for m in MEASURE_ONLY)} "
                              "may change)")
    os.makedirs(s.out, exist_ok=True)
    with open(grid, "w") as f:
        json.dump(s.fingerprint(), f, indent=1)


def base_job(s: Settings, *, sources: list[dict], seed: int, lr: float, steps: Optional[int] = None) -> dict:
    """A pretraining job: tiny preset, one process, no checkpoints but the final one, no evaluation in the
    loop (measure.py scores the final checkpoint on fixed windows instead), TensorBoard off."""
    steps = steps or s.steps
    return {
        "model": {"preset": "tiny"},
        "data": {"sources": sources, "seq_len": s.seq_len, "val_fraction": s.val_fraction,
                 "test_fraction": s.test_fraction, "split_by": s.split_by, "eval_batches": 4},
        "training": {"steps": steps, "micro_batch_size": s.batch, "lr": lr, "warmup_steps": max(1, steps // 20),
                     "eval_interval": 0, "seed": seed},
        "deepspeed": {"config": "ds_configs/zero0_fp32.json"},
        "checkpoint": {"interval": 0, "save_final": True},
        "monitor": {"log_interval": max(1, steps // 5), "tensorboard": False},
    }


def measure_cmds(s: Settings, domains: Sequence[str], old: Optional[str] = None) -> list[list[str]]:
    """experiments.science.measure on the validation split (measure.json: choose lrs by it) and on the test
    split (measure_test.json: report it), the runs' own fractions and split."""
    out = []
    for split, name in (("val", "measure.json"), ("test", "measure_test.json")):
        cmd = ["-m", "experiments.science.measure", "--checkpoint", rundir.checkpoint_dir("{run}"), "--out", "{run}/" + name,
               "--windows", str(s.windows), "--seq-len", str(s.seq_len), "--val-fraction", str(s.val_fraction),
               "--test-fraction", str(s.test_fraction), "--split-by", s.split_by, "--split", split,
               "--data"] + [s.domain(d) for d in domains]
        out.append(cmd + (["--old-experts", old] if old else []))
    return out


def run_dir(s: Settings, run: Run) -> str:
    return os.path.join(s.out, "runs", run.name)


def _env() -> dict:
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE",
               PYTHONPATH=REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""))
    return env


def _same_job(a: dict, b: dict) -> bool:
    """Equal once validated (the trainer saves the validated job, defaults filled in), name and run_dir aside."""
    from molm_ds.train.job import job_from_dict

    strip = lambda j: {k: v for k, v in job_from_dict(j, "job").model_dump().items()  # noqa: E731
                       if k not in ("name", "run_dir")}
    return strip(a) == strip(b)


def _copy_reused(run: Run, job: dict, d: str) -> bool:
    """Copy the results of an identical finished run: the same job file but its name and directory (the
    trainer is deterministic on the CPU, so training it again would give the same numbers) and the same
    measurement commands (every argument that changes what is measured: windows, split, fractions...)."""
    src = run.reuse
    if not (src and os.path.isfile(os.path.join(src, RESULT)) and os.path.isfile(os.path.join(src, rundir.JOB))):
        return False
    with open(os.path.join(src, rundir.JOB)) as f:
        if not _same_job(yaml.safe_load(f), job):
            return False
    if (read_json(os.path.join(src, RESULT)) or {}).get("after") != run.after:
        return False
    for name in os.listdir(src):
        if name not in (rundir.CHECKPOINTS, RESULT, rundir.JOB) and os.path.isfile(os.path.join(src, name)):
            shutil.copy2(os.path.join(src, name), os.path.join(d, name))
    with open(os.path.join(src, RESULT)) as f:
        res = json.load(f)
    with open(os.path.join(d, RESULT), "w") as f:
        json.dump({**res, "group": run.group, "reused_from": src}, f)
    return True


def is_done(s: Settings, run: Run) -> bool:
    """Finished with these very measurement commands."""
    res = read_json(os.path.join(run_dir(s, run), RESULT))
    return res is not None and res.get("after") == run.after


def _remeasure(s: Settings, run: Run, d: str) -> Optional[tuple[str, bool, float]]:
    """A trained run whose measurement commands changed, or whose measurement was interrupted: run the
    commands on its final checkpoint (None when the run must train again: another job, or no complete
    final checkpoint)."""
    res = read_json(os.path.join(d, RESULT))
    if run.job is None or not os.path.isfile(os.path.join(d, rundir.JOB)):
        return None
    steps = run.job["training"]["steps"]
    if not is_complete(rundir.checkpoint_dir(d), tag_for(steps)):
        return None  # training did not finish (an interrupted grid): train again
    res = res or {"seconds": None, "measured_after_interruption": True}
    with open(os.path.join(d, rundir.JOB)) as f:
        if not _same_job(yaml.safe_load(f), dict(run.job, name=run.name, run_dir=d)):
            return None
    t0 = time.time()
    with open(os.path.join(d, "log.txt"), "a") as log:
        log.write("# measurement commands changed: measuring the checkpoint again\n")
        for c in [[sys.executable] + [a.format(run=d) for a in c] for c in run.after]:
            log.write("$ " + " ".join(c) + "\n")
            log.flush()
            if subprocess.call(c, stdout=log, stderr=subprocess.STDOUT, env=_env(), cwd=REPO) != 0:
                return run.name, False, time.time() - t0
    with open(os.path.join(d, RESULT), "w") as f:
        json.dump({**res, "group": run.group, "after": run.after, "remeasured": True}, f)
    return run.name, True, time.time() - t0


def _execute(s: Settings, run: Run) -> tuple[str, bool, float]:
    d = run_dir(s, run)
    if is_done(s, run):
        return run.name, True, 0.0
    again = _remeasure(s, run, d)
    if again is not None:
        return again
    if os.path.isdir(d):  # an unfinished earlier attempt: start it over
        shutil.rmtree(d)
    os.makedirs(d)
    cmds = []
    if run.job is not None:
        job = dict(run.job, name=run.name, run_dir=d)
        with open(os.path.join(d, rundir.JOB), "w") as f:
            yaml.safe_dump(job, f, sort_keys=False)
        if _copy_reused(run, job, d):
            return run.name, True, 0.0
        cmds = [[sys.executable, os.path.join(REPO, "launch", "pretrain.py"), "--config", os.path.join(d, rundir.JOB)]]
    cmds += [[sys.executable] + [a.format(run=d) for a in c] for c in run.after]
    t0 = time.time()
    with open(os.path.join(d, "log.txt"), "w") as log:
        for c in cmds:
            log.write("$ " + " ".join(c) + "\n")
            log.flush()
            rc = subprocess.call(c, stdout=log, stderr=subprocess.STDOUT, env=_env(), cwd=REPO)
            if rc != 0:
                return run.name, False, time.time() - t0
    secs = time.time() - t0
    with open(os.path.join(d, RESULT), "w") as f:
        json.dump({"seconds": secs, "group": run.group, "after": run.after}, f)
    return run.name, True, secs


def execute(s: Settings, phases: list[list[Run]], *, report_only: bool = False) -> dict:
    """Run every phase in order (a phase's runs `--jobs` at a time); returns {name: ok}. Prints one line
    per run as it ends. report_only: start nothing (the tables then cover the finished runs)."""
    if report_only:
        n = sum(is_done(s, r) for p in phases for r in p)
        print(f"--report-only: {n}/{sum(len(p) for p in phases)} runs finished, none started", flush=True)
        return {}
    total = sum(len(p) for p in phases)
    done, status = 0, {}
    t0 = time.time()
    for phase in phases:
        todo = [r for r in phase if not is_done(s, r)]
        for r in phase:
            if r not in todo:
                done += 1
                status[r.name] = True
                print(f"[{done}/{total}] {r.name}: done earlier, skipped", flush=True)
        with ThreadPoolExecutor(max_workers=s.jobs) as pool:
            for name, ok, secs in pool.map(lambda r: _execute(s, r), todo):
                done += 1
                status[name] = ok
                where = os.path.join(s.out, "runs", name, "log.txt")
                print(f"[{done}/{total}] {name}: {'ok' if ok else 'FAILED, see ' + where} in {secs:.0f}s "
                      f"(grid {time.time() - t0:.0f}s)", flush=True)
        if not all(status[r.name] for r in phase):
            print(f"a run of this phase failed; the later phases depend on it and are not started", flush=True)
            break
    return status


# ---- reading what the tools wrote -----------------------------------------------------------------
def read_json(path: str) -> Optional[dict]:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def last_metrics(path: str) -> dict:
    """The last row of a metrics.jsonl that has a loss (the final step)."""
    last = {}
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            if "loss" in row:
                last = row
    return last


def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if not xs:
        return math.nan, math.nan
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


def sublayer_mean(measure: dict, domain: str, key: str, kind: Optional[str] = None) -> float:
    subs = measure["domains"][domain]["sublayers"]
    vals = [v[key] for tag, v in subs.items() if kind is None or tag.endswith("/" + kind)]
    return sum(vals) / len(vals)


def pooled_balance(measure: dict, domains: Sequence[str], kind: Optional[str] = None) -> tuple[float, float]:
    """(max/mean token count, H(m)/log E) of the domains pooled (their held-out windows together, as the
    training mixture pools them), averaged over sub-layers; NaNs for a measure.json without raw sums."""
    tags = [t for t in measure["domains"][domains[0]]["sublayers"] if kind is None or t.endswith("/" + kind)]
    mm, hh = [], []
    for t in tags:
        subs = [measure["domains"][d]["sublayers"][t] for d in domains]
        if "counts" not in subs[0]:
            return math.nan, math.nan
        E = len(subs[0]["counts"])
        n = [sum(x["counts"][e] for x in subs) for e in range(E)]
        p = [sum(x["p_mean"][e] for x in subs) / len(subs) for e in range(E)]  # equal tokens per domain
        mm.append(max(n) / (sum(n) / E))
        hh.append(-sum(q * math.log(q) for q in p if q > 0) / math.log(E))
    return sum(mm) / len(mm), sum(hh) / len(hh)


def aggregate(rows: list[dict], metrics: Sequence[str], *, select: str, by: str = "method") -> dict:
    """rows: one dict per finished run with `by`, 'lr', 'seed' and the metrics. Returns
    {method: {"best_lr", "n", "per_lr": {lr: {metric: (mean, std), "n": n}}}}; the best lr has the lowest
    mean of `select` over its seeds."""
    out: dict = {}
    for r in rows:
        out.setdefault(r[by], {}).setdefault(r["lr"], []).append(r)
    res = {}
    for method, per_lr in out.items():
        table = {}
        for lr, rs in sorted(per_lr.items()):
            table[lr] = {m: mean_std([x.get(m) for x in rs]) for m in metrics}
            table[lr]["n"] = len(rs)
        best = min(table, key=lambda lr: (math.inf if math.isnan(table[lr][select][0]) else table[lr][select][0]))
        res[method] = {"best_lr": best, "per_lr": table}
    return res


def fmt(ms: tuple[float, float], digits: int = 3) -> str:
    m, sd = ms
    if math.isnan(m):
        return "-"
    return f"{m:.{digits}f} ± {sd:.{digits}f}"


def markdown(agg: dict, metrics: Sequence[tuple[str, str, int]], *, order: Sequence[str], all_lrs: bool) -> str:
    """A table: one row per method at its best lr (or per method and lr). metrics: (key, header, digits)."""
    head = ["method", "lr", "seeds"] + [h for _, h, _ in metrics]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    for method in order:
        if method not in agg:
            continue
        a = agg[method]
        for lr in (sorted(a["per_lr"]) if all_lrs else [a["best_lr"]]):
            t = a["per_lr"][lr]
            mark = " (best)" if all_lrs and lr == a["best_lr"] else ""
            lines.append("| " + " | ".join([method, f"{lr:g}{mark}", str(t["n"])]
                                           + [fmt(t[k], d) for k, _, d in metrics]) + " |")
    return "\n".join(lines)


def plot(agg: dict, key: str, ylabel: str, path: str, order: Sequence[str], title: str) -> Optional[str]:
    """Mean ± std of `key` against lr, one line per method (matplotlib; skipped if it is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for method in order:
        if method not in agg:
            continue
        lrs = sorted(agg[method]["per_lr"])
        m = [agg[method]["per_lr"][lr][key][0] for lr in lrs]
        sd = [agg[method]["per_lr"][lr][key][1] for lr in lrs]
        ax.errorbar(lrs, m, yerr=sd, marker="o", capsize=3, label=method)
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def commit() -> dict:
    """The checkout's commit and whether it had uncommitted changes (what produced a result)."""
    def git(*a):
        r = subprocess.run(["git", "-C", REPO, *a], capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else ""

    return {"commit": git("rev-parse", "HEAD") or "unknown",
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no", "--", "molm_ds", "launch",
                              "experiments", "data_prep"))}


def split_sizes(s: Settings) -> dict:
    """{domain: {"split_by": how, "train"/"val"/"test": windows}} of the corpus at the grid's settings."""
    from molm_ds.data.mixture import SPLITS, split_source
    from molm_ds.data.packing import TokenStream

    out = {}
    for d in sorted(os.listdir(os.path.join(s.data, "shards"))):
        parts, how = split_source(TokenStream(s.domain(d)), s.seq_len, s.val_fraction, s.test_fraction, s.split_by)
        out[d] = {"split_by": how, **{name: int(len(w)) for name, w in zip(SPLITS, parts)}}
    return out


def write_report(s: Settings, title: str, body: str, summary: dict, seconds: float) -> None:
    prov = commit()
    splits = split_sizes(s)
    body += "\n\nWindows of " + str(s.seq_len) + " tokens per split (train / validation / test): " + "; ".join(
        f"{d} {v['train']:,} / {v['val']:,} / {v['test']:,} (by {v['split_by']})" for d, v in splits.items()) + "."
    summary = {**summary, "splits": splits}
    text = (f"# {title}\n\n{body}\n\nGrid wall time: {seconds:.0f} s ({s.jobs} runs at once). Corpus sha256 "
            f"{s.corpus_sha256}; code commit {prov['commit']}{' (with uncommitted changes)' if prov['dirty'] else ''}; "
            f"settings: `{json.dumps(s.fingerprint())}`\n")
    with open(os.path.join(s.out, "results.md"), "w") as f:
        f.write(text)
    with open(os.path.join(s.out, "results.json"), "w") as f:
        json.dump({"settings": s.fingerprint(), "corpus_sha256": s.corpus_sha256, **prov, "seconds": seconds,
                   **summary}, f, indent=1, default=str)
    print(text)
    if s.extra.get("publish"):
        publish(s, s.extra["publish"])


def publish(s: Settings, dest: str) -> None:
    """Copy the grid's small result files (results.json, results.md, *.png) to dest."""
    os.makedirs(dest, exist_ok=True)
    for name in sorted(os.listdir(s.out)):
        if name in ("results.json", "results.md") or name.endswith(".png"):
            shutil.copy2(os.path.join(s.out, name), os.path.join(dest, name))
    print(f"published results.json, results.md and plots to {dest}", flush=True)


def add_wall(s: Settings, seconds: float) -> float:
    """Add this invocation's wall time to out/timing.json; returns the grid's total over invocations
    (a resumed grid's cost is the sum of its invocations)."""
    path = os.path.join(s.out, "timing.json")
    t = read_json(path) or {"invocations": []}
    t["invocations"].append(round(seconds, 1))
    with open(path, "w") as f:
        json.dump(t, f)
    return sum(t["invocations"])
