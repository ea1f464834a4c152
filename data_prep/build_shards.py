"""Tokenise corpora in parallel into Megatron indexed shards plus a manifest.

    python -m data_prep.build_shards --tokenizer tok.model --out /data/shards/pile_en \\
        --input 'pile:/data/pile/train/*.jsonl.zst' --pile-subset Pile-CC --workers 32

Output directory: ``part-FFFFF-CCCCC.bin/.idx`` (input file F, chunk C of ``--docs-per-shard``
documents; every document is its SentencePiece ids followed by EOS, empty documents are dropped
and counted) and ``manifest.json`` (shards in order, per-input sha256 / documents / skipped
counts, token totals, tokenizer hash and special ids, dtype). uint16 tokens when the vocabulary
is below 65500, else int32.

Every shard is written to ``*.tmp`` and renamed when complete, and recorded in ``progress.json``;
a rerun with the same settings skips finished shards and finished inputs (an interrupted run
resumes), and a rerun of a finished directory does nothing. Different settings on an existing
directory are an error unless ``--overwrite``.

Corrupt input stops with ``FILE:LINE: why``; with ``--skip-corrupt`` it is skipped and counted in
the manifest (a truncated archive ends that input).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import json
import multiprocessing as mp
import os
import time

import numpy as np

from data_prep.indexed_writer import IndexedShardWriter, atomic_write_bytes
from data_prep.readers import ReadStats, SourceSpec, expand_inputs, read_source
from data_prep.train_tokenizer import file_sha256
from molm_ds.data.indexed import best_dtype
from molm_ds.log import get_logger

log = get_logger("data_prep.shards")

FORMAT = 1
BATCH_BYTES = 1 << 18  # text per task sent to a worker
BATCH_DOCS = 1024

_sp = None
_eos = None
_threads = -1


def _init_worker(model_path: str, threads: int = -1) -> None:
    """Load the tokenizer in this process. ``threads``: SentencePiece's batch-encode threads (-1: one per
    core, for the in-process ``workers=1`` path; 1 in each pool worker, so N workers use N cores)."""
    global _sp, _eos, _threads
    import sentencepiece as spm

    _sp = spm.SentencePieceProcessor(model_file=model_path)
    _eos = _sp.eos_id()
    _threads = threads


def encode_batch(task: tuple[str, list[str]]) -> tuple[str, np.ndarray, np.ndarray, int]:
    """(shard name, texts) -> (name, flat tokens with EOS after each document, lengths, empty docs)."""
    name, texts = task
    flat: list[int] = []
    lengths: list[int] = []
    empty = 0
    for ids in _sp.encode(texts, num_threads=_threads):
        if not ids:
            empty += 1
            continue
        flat.extend(ids)
        flat.append(_eos)
        lengths.append(len(ids) + 1)
    return name, np.array(flat, dtype=np.int32), np.array(lengths, dtype=np.int32), empty


def tokenizer_record(model_path: str) -> dict:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=model_path)
    if sp.eos_id() < 0:
        raise ValueError(f"{model_path} has no EOS piece; train one with data_prep.train_tokenizer (EOS id 2)")
    return {"model_path": os.path.abspath(model_path), "sha256": file_sha256(model_path),
            "vocab_size": sp.vocab_size(), "eos_id": sp.eos_id(), "bos_id": sp.bos_id(),
            "pad_id": sp.pad_id(), "unk_id": sp.unk_id()}


def _atomic_json(path: str, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1) + "\n").encode())


def _shard_name(file_idx: int, chunk: int) -> str:
    return f"part-{file_idx:05d}-{chunk:05d}"


@dataclasses.dataclass
class _FileEnd:
    file_idx: int
    stats: ReadStats


def build_shards(specs: list[SourceSpec], tokenizer_path: str, out_dir: str, *, workers: int = 1,
                 docs_per_shard: int = 100_000, subsets: set[str] | None = None, text_key: str = "text",
                 skip_corrupt: bool = False, overwrite: bool = False, progress: bool = True) -> dict:
    """Tokenise ``specs`` into ``out_dir``; returns the manifest. See the module docstring."""
    if not specs:
        raise ValueError("no inputs given")
    tok = tokenizer_record(tokenizer_path)
    dtype = best_dtype(tok["vocab_size"])
    fingerprint = {
        "format": FORMAT, "tokenizer_sha256": tok["sha256"], "dtype": dtype.name,
        "inputs": [{"kind": s.kind, "path": os.path.abspath(s.path), "size": os.path.getsize(s.path)
                    if os.path.isfile(s.path) else None} for s in specs],
        "subsets": sorted(subsets) if subsets else None, "text_key": text_key,
        "docs_per_shard": docs_per_shard, "skip_corrupt": skip_corrupt,
    }
    os.makedirs(out_dir, exist_ok=True)
    man_path, prog_path = os.path.join(out_dir, "manifest.json"), os.path.join(out_dir, "progress.json")
    for path in (man_path, prog_path):
        if os.path.exists(path):
            with open(path) as f:
                old = json.load(f)
            if old.get("fingerprint") != fingerprint:
                if not overwrite:
                    raise ValueError(f"{out_dir} was built with different settings or inputs ({path}); "
                                     "use a new --out directory or pass --overwrite")
                for p in glob.glob(os.path.join(out_dir, "part-*")) + [man_path, prog_path]:
                    if os.path.exists(p):
                        os.remove(p)
    if os.path.exists(man_path):
        log.info("%s is complete; nothing to do", out_dir)
        with open(man_path) as f:
            return json.load(f)
    for p in glob.glob(os.path.join(out_dir, "*.tmp")):
        os.remove(p)
    prog = {"fingerprint": fingerprint, "shards": {}, "files": {}}
    if os.path.exists(prog_path):
        with open(prog_path) as f:
            prog = json.load(f)
        prog["shards"] = {n: r for n, r in prog["shards"].items()
                          if os.path.exists(os.path.join(out_dir, n + ".idx"))
                          and os.path.exists(os.path.join(out_dir, n + ".bin"))}
        if prog["shards"] or prog["files"]:
            log.info("resuming %s: %d shards and %d inputs already done", out_dir, len(prog["shards"]), len(prog["files"]))

    total_bytes = sum(os.path.getsize(s.path) for i, s in enumerate(specs)
                      if os.path.isfile(s.path) and str(i) not in prog["files"])
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"tokenising -> {os.path.basename(out_dir)}")

    def tasks():
        for fi, spec in enumerate(specs):
            if str(fi) in prog["files"]:
                continue
            stats = ReadStats()
            docs = read_source(spec, subsets=subsets, text_key=text_key, stats=stats, skip_corrupt=skip_corrupt,
                               on_bytes=bar.update if bar else None)
            batch, size, name = [], 0, None
            for n, doc in enumerate(docs):
                cur = _shard_name(fi, n // docs_per_shard)
                if cur != name and batch:
                    yield name, batch
                    batch, size = [], 0
                name = cur
                if name in prog["shards"]:
                    continue
                batch.append(doc)
                size += len(doc)
                if size >= BATCH_BYTES or len(batch) >= BATCH_DOCS:
                    yield name, batch
                    batch, size = [], 0
            if batch:
                yield name, batch
            yield _FileEnd(fi, stats)

    writer: IndexedShardWriter | None = None
    cur = {"name": None, "empty": 0}

    def finish_current():
        if writer is None:
            return
        ndocs, ntok = writer.finish()
        prog["shards"][cur["name"]] = {"docs": ndocs, "tokens": ntok, "empty": cur["empty"]}
        _atomic_json(prog_path, prog)

    pool = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn").Pool(
        workers, _init_worker, (tokenizer_path, 1)) if workers > 1 else None
    if pool is None:
        _init_worker(tokenizer_path)
    t0, n_tokens = time.perf_counter(), 0
    pending: collections.deque = collections.deque()
    source = tasks()
    try:
        while True:
            while len(pending) < 4 * max(workers, 1):  # bounded read-ahead
                item = next(source, None)
                if item is None:
                    break
                if isinstance(item, _FileEnd):
                    pending.append(item)
                else:
                    pending.append(pool.apply_async(encode_batch, (item,)) if pool else encode_batch(item))
            if not pending:
                break
            item = pending.popleft()
            if isinstance(item, _FileEnd):
                finish_current()
                writer, cur["name"] = None, None
                s = item.stats
                prog["files"][str(item.file_idx)] = {
                    "sha256": s.sha256, "docs": s.docs, "skipped_corrupt": s.skipped_corrupt,
                    "filtered": s.filtered, "truncated": s.truncated, "errors": s.first_errors}
                _atomic_json(prog_path, prog)
                continue
            name, tokens, lengths, empty = item.get() if pool else item
            if name != cur["name"]:
                finish_current()
                writer = IndexedShardWriter(os.path.join(out_dir, name), dtype)
                cur["name"], cur["empty"] = name, 0
            writer.add_documents(tokens, lengths)
            cur["empty"] += empty
            n_tokens += len(tokens)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        if pool is not None:
            pool.terminate()
        if bar is not None:
            bar.close()
    finish_current()
    secs = time.perf_counter() - t0

    shards, sources = [], []
    for name in sorted(prog["shards"]):
        r = prog["shards"][name]
        if r["docs"]:
            shards.append({"prefix": name, "docs": r["docs"], "tokens": r["tokens"], "input": int(name[5:10])})
    for fi, spec in enumerate(specs):
        f = prog["files"][str(fi)]
        empty = sum(r["empty"] for n, r in prog["shards"].items() if int(n[5:10]) == fi)
        sources.append({"kind": spec.kind, "path": os.path.abspath(spec.path), **f, "empty_docs": empty})
    manifest = {
        "format": FORMAT, "fingerprint": fingerprint, "tokenizer": tok, "dtype": dtype.name,
        "documents": sum(s["docs"] for s in shards), "tokens": sum(s["tokens"] for s in shards),
        "skipped_corrupt": sum(s["skipped_corrupt"] for s in sources),
        "shards": shards, "sources": sources,
    }
    _atomic_json(man_path, manifest)
    os.remove(prog_path)
    log.info("%s: %d documents, %d tokens (%d this run in %.1fs)", out_dir, manifest["documents"],
             manifest["tokens"], n_tokens, secs)
    return manifest


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m data_prep.build_shards", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", action="append", required=True, metavar="KIND:PATH",
                   help="corpus file(s), glob allowed (quote it); KIND: pile, cc100, jsonl, text, lines, hf")
    p.add_argument("--tokenizer", required=True, help="SentencePiece .model (from data_prep.train_tokenizer or existing)")
    p.add_argument("--out", required=True, help="output shard directory (give it to the loader as a DataSource)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenising processes")
    p.add_argument("--docs-per-shard", type=int, default=100_000, help="documents per shard file (resume unit)")
    p.add_argument("--pile-subset", action="append", help="keep only records with this meta.pile_set_name (repeat)")
    p.add_argument("--text-key", default="text", help="text field for jsonl and hf inputs")
    p.add_argument("--skip-corrupt", action="store_true", help="skip and count corrupt input instead of stopping")
    p.add_argument("--overwrite", action="store_true", help="discard an existing output built with other settings")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    from molm_ds.log import setup_logging

    setup_logging()
    t0 = time.perf_counter()
    man = build_shards(expand_inputs(a.input), a.tokenizer, a.out, workers=a.workers,
                       docs_per_shard=a.docs_per_shard, subsets=set(a.pile_subset) if a.pile_subset else None,
                       text_key=a.text_key, skip_corrupt=a.skip_corrupt, overwrite=a.overwrite,
                       progress=not a.no_progress)
    print(f"{a.out}: {len(man['shards'])} shards, {man['documents']} documents, {man['tokens']} tokens, "
          f"{man['skipped_corrupt']} corrupt skipped ({time.perf_counter() - t0:.1f}s)")


if __name__ == "__main__":
    main()
