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
"""

from __future__ import annotations

import argparse
import json
import os
import random
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=24.0, help="corpus size in MB of text")
    p.add_argument("--files", type=int, default=4)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--vocab-size", type=int, default=4096)
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
        print(json.dumps({"e2e_mb_per_s": round(e2e / 1e6, 3), "tokens_per_s": round(man["tokens"] / secs),
                          "raw_encode_mb_per_s_1thread": round(raw / 1e6, 3), "workers": a.workers,
                          "encode_threads": threads,
                          "fraction_of_limit": round(frac, 3)}))


if __name__ == "__main__":
    main()
