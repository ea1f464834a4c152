"""Tokenisation throughput: end-to-end ``build_shards`` vs raw SentencePiece encode, in one run.

    python benchmarks/data_prep.py [--mb 24] [--workers 2] [--vocab-size 4096]

Generates a Pile-format corpus (``--files`` x .jsonl.zst, documents drawn from pydoc prose and
standard-library source), trains a tokenizer on it, measures raw ``sp.encode`` throughput of one
thread on the same documents (batched list encode, no I/O), then times ``build_shards`` with
``--workers`` processes (read + decompress + JSON + encode + write shards + manifest). Prints
tokens/s and MB/s of text, and as the last line JSON with
``fraction_of_limit = end-to-end MB/s / (raw MB/s of one thread * encode threads)`` (target >= 0.8);
encode threads = ``--workers`` (one per pool worker), or the core count for ``--workers 1`` (the
in-process path lets SentencePiece's batch encode use every core).

Then, with ``mpirun`` and mpi4py (skipped with a note without them, or with ``--ranks 1``), the same
``python -m data_prep.build_shards`` command on 1 rank and on ``--ranks`` ranks, one encode thread
each (``--workers 1``), into two directories: tokens/s per rank (tokenising time of each rank), the
wall-clock of each command, ``ranks_scaling`` = all tokens over the slowest rank's tokenising time,
N ranks over 1 (ideal: N, where N cores are free), ``ranks_scaling_wall`` the same on each command's
wall-clock (start-up, checks and manifest included: small corpora are dominated by them), and
whether the two directories are byte-identical (they must be).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import zstandard  # noqa: E402

from data_prep.build_shards import build_shards  # noqa: E402
from data_prep.embedded import code_documents, prose_documents  # noqa: E402
from data_prep.readers import SourceSpec  # noqa: E402
from data_prep.train_tokenizer import train_tokenizer  # noqa: E402


def make_corpus(d: str, mb: float, files: int, seed: int = 0) -> tuple[list[SourceSpec], list[str]]:
    rng = random.Random(seed)
    pool = [p for doc in prose_documents() for p in doc.split("\n\n") if p.strip()]
    pool += [c[i: i + 3000] for c in code_documents(3_000_000) for i in range(0, len(c), 3000)]
    specs, sample, per_file = [], [], int(mb * 1e6 / files)
    for f in range(files):
        docs, size = [], 0
        while size < per_file:
            doc = "\n\n".join(rng.choice(pool) for _ in range(rng.randint(1, 6)))
            docs.append(doc)
            size += len(doc.encode())
        if f == 0:
            sample = docs
        path = os.path.join(d, f"{f:02d}.jsonl.zst")
        body = "".join(json.dumps({"text": t, "meta": {"pile_set_name": "bench"}}) + "\n" for t in docs)
        with open(path, "wb") as fh:
            fh.write(zstandard.ZstdCompressor(level=3).compress(body.encode()))
        specs.append(SourceSpec("pile", path))
    return specs, sample


def raw_encode_rate(model: str, docs: list[str], min_seconds: float = 3.0) -> float:
    """Bytes of text per second for sp.encode on batches of documents, one thread (SentencePiece's batch
    encode otherwise spreads over every core, which made the old "1 process" limit a 2-core figure)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=model)
    nbytes = sum(len(t.encode()) for t in docs)
    done, t0 = 0, time.perf_counter()
    while True:
        for i in range(0, len(docs), 256):
            sp.encode(docs[i: i + 256], num_threads=1)
        done += nbytes
        if time.perf_counter() - t0 >= min_seconds:
            return done / (time.perf_counter() - t0)


RANK_LINE = re.compile(r"rank (\d+) of (\d+): (\d+) tokens in ([\d.]+)s")


def mpirun_build(n: int, specs, model: str, out: str) -> tuple[float, list[tuple[int, int, float]]]:
    """Wall seconds of ``mpirun -np n python -m data_prep.build_shards ...`` and (rank, tokens, seconds)
    per rank as the command printed them."""
    mpirun = shutil.which("mpirun") or os.path.join(os.path.dirname(sys.executable), "mpirun")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)  # another launcher's, inherited from the caller: mpirun's ranks have their own
    cmd = [mpirun, "--oversubscribe", "-np", str(n), "-x", "PYTHONPATH", sys.executable, "-m", "data_prep.build_shards",
           "--tokenizer", model, "--out", out, "--docs-per-shard", "500", "--workers", "1", "--no-progress"]
    cmd[1:1] = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    for s in specs:
        cmd += ["--input", f"{s.kind}:{s.path}"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    return wall, [(int(m[1]), int(m[3]), float(m[4])) for m in RANK_LINE.finditer(r.stdout)]


def same_tree(a: str, b: str) -> bool:
    names = sorted(os.listdir(a))
    if names != sorted(os.listdir(b)):
        return False
    return all(open(os.path.join(a, n), "rb").read() == open(os.path.join(b, n), "rb").read() for n in names)


def ranks_section(d: str, specs, model: str, n: int) -> dict:
    """1 rank vs n ranks, side by side on the same corpus."""
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        print("ranks: skipped (mpi4py is not installed)")
        return {}
    res = {}
    for k in (1, n):
        # both write the same --out, so that the command recorded in the manifest is the same
        wall, per_rank = mpirun_build(k, specs, model, os.path.join(d, "ranked"))
        os.rename(os.path.join(d, "ranked"), os.path.join(d, f"ranked{k}"))
        tokens = sum(t for _, t, _ in per_rank)
        res[k] = {"wall": wall, "tokens": tokens, "per_rank": per_rank}
        print(f"mpirun -np {k}, 1 encode thread per rank: {tokens} tokens, {wall:.2f}s wall, "
              f"{tokens / wall:,.0f} tokens/s")
        for r, t, s in per_rank:
            print(f"  rank {r}: {t} tokens in {s:.2f}s, {t / s if s else 0:,.0f} tokens/s")
    def rate(k, wall=False):  # the command's tokens over its wall-clock, or over its slowest rank's tokenising
        return res[k]["tokens"] / (res[k]["wall"] if wall else max(s for _, _, s in res[k]["per_rank"]))

    scaling, scaling_wall = rate(n) / rate(1), rate(n, True) / rate(1, True)
    identical = same_tree(os.path.join(d, "ranked1"), os.path.join(d, f"ranked{n}"))
    print(f"scaling 1 -> {n} ranks: x{scaling:.2f} tokens/s while tokenising (slowest rank), x{scaling_wall:.2f} "
          "on the commands' wall-clock (start-up and checks included); outputs "
          + ("byte-identical" if identical else "DIFFER"))
    return {"ranks": n, "ranks_scaling": round(scaling, 3), "ranks_scaling_wall": round(scaling_wall, 3),
            "ranks_identical": identical,
            "tokens_per_s_per_rank": [round(t / s) if s else 0 for _, t, s in res[n]["per_rank"]],
            "tokens_per_s_1rank": round(res[1]["per_rank"][0][1] / res[1]["per_rank"][0][2])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=24.0, help="corpus size in MB of text")
    p.add_argument("--files", type=int, default=4)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--ranks", type=int, default=2, help="ranks for the 1-vs-N comparison (1: skip it)")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        specs, sample = make_corpus(d, a.mb, a.files)
        text_bytes = 0
        for s in specs:
            from data_prep.readers import read_json_records

            text_bytes += sum(len(t.encode()) for t in read_json_records(s.path))
        model = train_tokenizer(specs[:1], os.path.join(d, "tok"), vocab_size=a.vocab_size, docs_per_source=2000)
        raw = raw_encode_rate(model, sample)
        print(f"raw SentencePiece encode, 1 thread: {raw / 1e6:.2f} MB/s")
        t0 = time.perf_counter()
        man = build_shards(specs, model, os.path.join(d, "shards"), workers=a.workers, progress=False)
        secs = time.perf_counter() - t0
        e2e = text_bytes / secs
        print(f"end-to-end build_shards, {a.workers} workers: {text_bytes / 1e6:.1f} MB of text, "
              f"{man['tokens']} tokens in {secs:.2f}s")
        print(f"  {man['tokens'] / secs:,.0f} tokens/s, {e2e / 1e6:.2f} MB/s")
        # build_shards encodes with 1 thread per pool worker, or SentencePiece's threads (one per core) when
        # workers == 1: the limit is the 1-thread rate times the threads it encodes with
        threads = a.workers if a.workers > 1 else (os.cpu_count() or 1)
        frac = e2e / (raw * threads)
        ranked = ranks_section(d, specs, model, a.ranks) if a.ranks > 1 else {}
        print(json.dumps({"e2e_mb_per_s": round(e2e / 1e6, 3), "tokens_per_s": round(man["tokens"] / secs),
                          "raw_encode_mb_per_s_1thread": round(raw / 1e6, 3), "workers": a.workers,
                          "encode_threads": threads,
                          "fraction_of_limit": round(frac, 3), **ranked}))


if __name__ == "__main__":
    main()
