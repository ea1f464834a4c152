"""Tokenise corpora in parallel into Megatron indexed shards plus a manifest.

    python -m data_prep.build_shards --tokenizer tok.model --out /data/shards/pile_en \\
        --input 'pile:/data/pile/train/*.jsonl.zst' --pile-subset Pile-CC --workers 32

Output directory: ``part-FFFFF-CCCCC.bin/.idx`` (input file F, chunk C of ``--docs-per-shard``
documents; every document is its SentencePiece ids followed by EOS, empty documents are dropped
and counted) and ``manifest.json`` (shards in order with their file sizes, per-input identity,
sha256, documents and what was dropped, token totals, tokenizer hash and special ids, dtype),
written last: a directory without it is unfinished and the loader refuses it. uint16 tokens when
the vocabulary is below 65500, else int32.

Every shard is written to ``*.tmp`` and renamed when complete, and recorded in ``progress.json``;
a rerun with the same settings skips finished shards and finished inputs (an interrupted run
resumes), and a rerun of a finished directory does nothing. Other settings, or an input whose
content changed (size, modification time or sampled blocks, see ``data_prep.identity``), are
refused unless ``--overwrite``. ``--skip-corrupt`` is not a setting in that sense: after a stop on
corrupt input, the same command with ``--skip-corrupt`` continues from the finished shards.

Across machines: ``mpirun -np N python -m data_prep.build_shards ...`` (or ``srun -n N``; ranks come
from the launcher's environment, see ``data_prep.ranks``) writes the same directory, byte for byte,
as one process. Shard names and boundaries depend only on the inputs and ``--docs-per-shard``; the
ranks split the work by shard: small inputs go whole to one rank, the chunks of an input larger than
a rank's share are dealt round-robin to every rank (each reads that input and tokenises only its own
chunks). Rank 0 checks the directory and plans, every rank writes its own shards and progress file
(``progress.json`` on rank 0, ``progress.rank-RRRRR.json`` on the others), and rank 0 writes the
manifest once every rank has finished. A rerun resumes with any N: the number of ranks and
``--workers`` change nothing in the output, so they are not settings in the sense above.

Corrupt input stops with ``FILE:LINE: why``; with ``--skip-corrupt`` it is dropped and counted
(records or documents, their bytes, undecodable compressed bytes; decoding resumes at the next
member that decodes) in the manifest and on the console. A run that yields no document is an error
(exit 2, no manifest) naming the subset names that would have matched.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import json
import multiprocessing as mp
import os
import shlex
import signal
import socket
import sys
import time

import numpy as np

from data_prep import ranks as ranks_mod
from data_prep import subsets as subset_names
from data_prep.identity import describe_change, identity
from data_prep.indexed_writer import IndexedShardWriter, atomic_write_bytes
from data_prep.readers import ReadStats, SourceSpec, check_inputs, expand_inputs, read_source
from data_prep.spm_model import tokenizer_record
from molm_ds.data.indexed import best_dtype
from molm_ds.data.manifest import MANIFEST, PROGRESS
from molm_ds.errors import ConfigError, DataError, UserError, one_line
from molm_ds.log import get_logger
from molm_ds.paths import ensure_writable_dir

log = get_logger("data_prep.shards")

FORMAT = 2  # 2: shard file sizes and input identities in the manifest
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


def _init_pool_worker(model_path: str) -> None:
    """A pool worker: one SentencePiece thread. Ctrl-C reaches the whole process group: the parent stops
    the pool, so the workers ignore it rather than each print a KeyboardInterrupt traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _init_worker(model_path, 1)


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


def _atomic_json(path: str, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1) + "\n").encode())


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path} cannot be read ({e}); remove it and rerun, or pass --overwrite") from None


def _shard_name(file_idx: int, chunk: int) -> str:
    return f"part-{file_idx:05d}-{chunk:05d}"


def _shard_files(out_dir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(out_dir, "part-*")))


def build_command(specs, tokenizer_path, out_dir, *, subsets, text_key, docs_per_shard, skip_corrupt) -> str:
    """The command line that builds (or finishes) ``out_dir`` with these settings."""
    args = ["python", "-m", "data_prep.build_shards", "--tokenizer", tokenizer_path, "--out", out_dir]
    for s in specs:
        args += ["--input", f"{s.kind}:{s.path}"]
    for name in sorted(subsets or ()):
        args += ["--pile-subset", name]
    if text_key != "text":
        args += ["--text-key", text_key]
    args += ["--docs-per-shard", str(docs_per_shard)] + (["--skip-corrupt"] if skip_corrupt else [])
    return f"cd {shlex.quote(os.getcwd())} && {shlex.join(args)}"


def fingerprint_diff(old: dict, new: dict) -> list[str]:
    """What differs between two fingerprints, in words (empty when they are equal)."""
    out = []
    for key in sorted(set(old) | set(new)):
        if key == "inputs" or old.get(key) == new.get(key):
            continue
        out.append(f"{key}: {old.get(key)!r} -> {new.get(key)!r}")
    a, b = old.get("inputs") or [], new.get("inputs") or []
    if [(i.get("kind"), i.get("path")) for i in a] != [(i["kind"], i["path"]) for i in b]:
        out.append(f"inputs: {len(a)} files -> {len(b)} files (other files or order)")
    else:
        for i, j in zip(a, b):
            if i.get("identity") != j["identity"]:
                out.append(describe_change(j["path"], i.get("identity") or {}, j["identity"]))
    return out


@dataclasses.dataclass
class _FileEnd:
    file_idx: int
    stats: ReadStats


@dataclasses.dataclass
class _Stop:
    """The reader of the current input raised a user error; everything read before it is still written."""

    error: UserError


def _check_settings(specs, docs_per_shard, workers) -> None:
    if not specs:
        raise ConfigError("no inputs given: pass --input KIND:PATH (one or more)")
    if not isinstance(docs_per_shard, int) or docs_per_shard < 1:
        raise ConfigError(f"--docs-per-shard must be a whole number >= 1, got {docs_per_shard!r}")
    if not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"--workers must be a whole number >= 1, got {workers!r}")


def _rank_progress_files(out_dir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(out_dir, "progress.rank-*.json")))


def _progress_path(out_dir: str, rank: int) -> str:
    return os.path.join(out_dir, PROGRESS if rank == 0 else f"progress.rank-{rank:05d}.json")


def _prepare_dir(out_dir: str, fingerprint: dict, overwrite: bool) -> dict | None:
    """Check what ``out_dir`` already holds against this build. Returns the finished manifest when there is
    nothing to do, else None (the caller starts or resumes from the progress files)."""
    ensure_writable_dir(out_dir, what="--out", error=DataError)
    man_path, prog_path = os.path.join(out_dir, MANIFEST), os.path.join(out_dir, PROGRESS)
    state = man_path if os.path.exists(man_path) else prog_path if os.path.exists(prog_path) else None
    old = _read_json(state) if state else None
    stray = _shard_files(out_dir)
    rank_files = _rank_progress_files(out_dir)

    def discard(reason: str) -> None:
        log.warning("%s: %s; discarding %d shard files (--overwrite)", out_dir, reason, len(stray))
        for p in stray + rank_files + [man_path, prog_path]:
            if os.path.exists(p):
                os.remove(p)

    if old is None:
        if stray:
            if not overwrite:
                raise DataError(f"{out_dir} holds {len(stray)} shard files but no {MANIFEST} or {PROGRESS}, so they "
                                "cannot be resumed or checked; use a new --out or pass --overwrite to replace them")
            discard("shard files without progress")
        for p in rank_files:
            os.remove(p)
        return None
    diff = fingerprint_diff(old.get("fingerprint") or {}, fingerprint)
    if not diff:
        return old if state == man_path else None
    finished = state == man_path
    done = len(old.get("shards") or []) if finished else len(_finished_shards(out_dir, _merged_progress(out_dir)))
    if not done and not overwrite:
        log.info("%s: the earlier run wrote no shard; starting over (%s)", out_dir, "; ".join(diff))
        for p in stray + rank_files + [prog_path]:
            if os.path.exists(p):
                os.remove(p)
        return None
    if not overwrite:
        what = "a finished build" if finished else f"an unfinished build ({done} shards done)"
        raise DataError(f"{out_dir} holds {what} with other settings or inputs: " + "; ".join(diff)
                        + ". Use a new --out, or pass --overwrite to discard its shards and rebuild")
    discard("; ".join(diff))
    return None


def _merged_progress(out_dir: str, fingerprint: dict | None = None) -> dict:
    """The union of every rank's progress file (``fingerprint``: only files written with it), keeping the
    shard records whose files are on disk."""
    merged: dict = {"shards": {}, "files": {}}
    for p in [os.path.join(out_dir, PROGRESS)] + _rank_progress_files(out_dir):
        if not os.path.exists(p):
            continue
        old = _read_json(p)
        if fingerprint is not None and fingerprint_diff(old.get("fingerprint") or {}, fingerprint):
            log.warning("%s was written with other settings; ignoring it", p)
            continue
        merged["shards"].update(old.get("shards") or {})
        merged["files"].update(old.get("files") or {})
    merged["shards"] = {n: r for n, r in sorted(merged["shards"].items())
                        if os.path.exists(os.path.join(out_dir, n + ".idx"))
                        and os.path.exists(os.path.join(out_dir, n + ".bin"))}
    return merged


def _finished_shards(out_dir: str, prog: dict) -> list[str]:
    return [n for n, r in prog["shards"].items() if r.get("docs")]


def _chunks_of(file_record: dict, docs_per_shard: int) -> int:
    return -(-file_record["docs"] // docs_per_shard)


def _file_done(fi: int, prog: dict, docs_per_shard: int) -> bool:
    """Input ``fi`` was read to its end and every one of its chunks is written."""
    f = prog["files"].get(str(fi))
    return f is not None and all(_shard_name(fi, c) in prog["shards"] for c in range(_chunks_of(f, docs_per_shard)))


def plan_owners(sizes: list[int], todo: list[int], nranks: int) -> dict[int, int | None]:
    """Which rank reads each input still to do: a rank number, or None for an input larger than one rank's
    share, whose chunks are dealt to every rank (``owns``). The rest go whole to the least loaded rank,
    largest first. Only who does the work depends on ``nranks``, never what is written."""
    share = sum(sizes[i] for i in todo) / nranks
    owners: dict[int, int | None] = {}
    load = [0.0] * nranks
    for fi in todo:
        if nranks > 1 and sizes[fi] > share:
            owners[fi] = None
            load = [x + sizes[fi] / nranks for x in load]
    for fi in sorted((i for i in todo if i not in owners), key=lambda i: (-sizes[i], i)):
        r = min(range(nranks), key=lambda k: (load[k], k))
        owners[fi] = r
        load[r] += sizes[fi]
    return owners


def owns(owner: int | None, fi: int, chunk: int, rank: int, nranks: int) -> bool:
    """Whether ``rank`` writes chunk ``chunk`` of input ``fi``."""
    return owner == rank if owner is not None else (fi + chunk) % nranks == rank


class _RankFailed(DataError):
    """Another rank stopped; it printed (or logged) why."""


def build_shards(specs: list[SourceSpec], tokenizer_path: str, out_dir: str, *, workers: int = 1,
                 docs_per_shard: int = 100_000, subsets: set[str] | None = None, text_key: str = "text",
                 skip_corrupt: bool = False, overwrite: bool = False, progress: bool = True,
                 command: str | None = None, ranks: ranks_mod.Ranks | None = None,
                 run_stats: dict | None = None) -> dict:
    """Tokenise ``specs`` into ``out_dir``; returns the manifest. See the module docstring.
    ``command``: how to rerun this build (kept in progress.json for the loader's advice); by default it
    is written out from the arguments. ``ranks``: this process's rank (default: one process); every rank
    calls this with the same arguments and gets the same manifest. ``run_stats``, if given, receives this
    run's tokens and seconds per rank (``per_rank``: a list of ``{"rank", "tokens", "seconds", "host"}``)."""
    ranks = ranks or ranks_mod.Ranks()
    # 1. every check a user's mistake can fail, before any tokenising (every rank runs them on the same inputs)
    _check_settings(specs, docs_per_shard, workers)
    tok = tokenizer_record(tokenizer_path)
    idents = [identity(s.path) for s in specs]
    check_inputs(specs, skip_corrupt)
    subset_names.check_before_run(specs, subsets)
    dtype = best_dtype(tok["vocab_size"])
    fingerprint = {
        "format": FORMAT, "tokenizer_sha256": tok["sha256"], "dtype": dtype.name,
        "inputs": [{"kind": s.kind, "path": os.path.abspath(s.path), "identity": i} for s, i in zip(specs, idents)],
        "subsets": sorted(subsets) if subsets else None, "text_key": text_key, "docs_per_shard": docs_per_shard,
    }
    command = command or build_command(specs, tokenizer_path, out_dir, subsets=subsets, text_key=text_key,
                                       docs_per_shard=docs_per_shard, skip_corrupt=skip_corrupt)

    # 2. rank 0 checks the directory, gathers what earlier runs finished and plans who does what
    plan = None
    if ranks.rank == 0:
        try:
            plan = _plan(out_dir, fingerprint, overwrite, command, docs_per_shard, ranks.size)
        except Exception as e:
            ranks.bcast(("error", one_line(e) if isinstance(e, UserError) else repr(e)))
            raise
    plan = ranks.bcast(plan)
    if plan[0] == "error":
        raise _RankFailed(f"rank 0 stopped: {plan[1]}")
    if plan[0] == "finished":
        log.info("%s is complete; nothing to do", out_dir)
        return plan[1]
    _, done, owners = plan
    prog = {"fingerprint": fingerprint, "command": command, "shards": dict(done["shards"]),
            "files": dict(done["files"])}
    prog_path = _progress_path(out_dir, ranks.rank)
    if ranks.rank != 0:
        _atomic_json(prog_path, prog)

    # 3. every rank tokenises its part
    error, n_tokens, t0 = None, 0, time.perf_counter()
    try:
        n_tokens = _tokenise(specs, tokenizer_path, out_dir, prog, prog_path, owners, ranks, dtype=dtype,
                             workers=workers, docs_per_shard=docs_per_shard, subsets=subsets, text_key=text_key,
                             skip_corrupt=skip_corrupt, progress=progress)
    except Exception as e:  # every rank takes part in the exchange below, or the others wait for ever
        error = e
    secs = time.perf_counter() - t0
    outcome = ranks.allgather((one_line(error) if isinstance(error, UserError) else repr(error) if error else None,
                               n_tokens, secs, socket.gethostname()))
    if error is not None:
        raise error
    failed = [(r, why) for r, (why, *_) in enumerate(outcome) if why]
    if failed:
        raise _RankFailed(f"rank {failed[0][0]} of {ranks.size} stopped: {failed[0][1]}")
    if run_stats is not None:
        run_stats.update(rank=ranks.rank, ranks=ranks.size, tokens=n_tokens, seconds=secs,
                         per_rank=[{"rank": r, "tokens": t, "seconds": s, "host": host}
                                   for r, (_, t, s, host) in enumerate(outcome)])

    # 4. rank 0 writes the manifest, unless nothing came out
    result = None
    if ranks.rank == 0:
        try:
            result = ("ok", _finish(specs, out_dir, fingerprint, tok, dtype, command, subsets, docs_per_shard))
        except Exception as e:
            result = ("error", one_line(e) if isinstance(e, UserError) else repr(e))
            ranks.bcast(result)
            raise
    result = ranks.bcast(result)
    if result[0] == "error":
        raise _RankFailed(f"rank 0 stopped: {result[1]}")
    manifest = result[1]
    log.info("%s: %d documents, %d tokens (%d this run on rank %d of %d in %.1fs)", out_dir, manifest["documents"],
             manifest["tokens"], n_tokens, ranks.rank, ranks.size, secs)
    return manifest


def _plan(out_dir, fingerprint, overwrite, command, docs_per_shard, nranks) -> tuple:
    """Rank 0: ("finished", manifest) or ("todo", progress so far, owners of the inputs still to do)."""
    finished = _prepare_dir(out_dir, fingerprint, overwrite)
    if finished is not None:  # progress files are left only by a run killed just after its manifest
        for p in _rank_progress_files(out_dir) + glob.glob(os.path.join(out_dir, PROGRESS)):
            os.remove(p)
        return "finished", finished
    for p in glob.glob(os.path.join(out_dir, "*.tmp")):
        os.remove(p)
    done = _merged_progress(out_dir, fingerprint)
    if done["shards"] or done["files"]:
        log.info("resuming %s: %d shards and %d inputs already done", out_dir, len(done["shards"]), len(done["files"]))
    _atomic_json(os.path.join(out_dir, PROGRESS), {"fingerprint": fingerprint, "command": command, **done})
    sizes = [fp["identity"]["size"] for fp in fingerprint["inputs"]]
    todo = [fi for fi in range(len(sizes)) if not _file_done(fi, done, docs_per_shard)]
    return "todo", done, plan_owners(sizes, todo, nranks)


def _finish(specs, out_dir, fingerprint, tok, dtype, command, subsets, docs_per_shard) -> dict:
    """Rank 0, after every rank finished: the manifest from every rank's progress."""
    prog = _merged_progress(out_dir, fingerprint)
    missing = [fi for fi in range(len(specs)) if not _file_done(fi, prog, docs_per_shard)]
    if missing:
        raise DataError(f"{out_dir}: input {specs[missing[0]].path} is not fully written although every rank "
                        "finished; rerun the same command (it resumes)")
    manifest = _manifest(specs, prog, fingerprint, tok, dtype, command, subsets)
    if manifest["documents"] == 0:
        raise DataError(_nothing_message(manifest, subsets) + f" ({out_dir} has no manifest; fix the command and "
                        "rerun it: nothing was written that a rerun would have to keep)")
    _atomic_json(os.path.join(out_dir, MANIFEST), manifest)
    for p in _rank_progress_files(out_dir) + [os.path.join(out_dir, PROGRESS)]:
        os.remove(p)
    return manifest


def _tokenise(specs, tokenizer_path, out_dir, prog, prog_path, owners, ranks, *, dtype, workers, docs_per_shard,
              subsets, text_key, skip_corrupt, progress) -> int:
    """Read, tokenise and write, in order, the chunks of ``owners``' inputs that this rank owns and that are
    not in ``prog`` yet, recording each in ``prog_path``. Returns the tokens written."""
    rank, nranks = ranks.rank, ranks.size
    mine = [fi for fi in sorted(owners) if owners[fi] is None or owners[fi] == rank]
    total_bytes = sum(os.path.getsize(specs[fi].path) for fi in mine if not os.path.isdir(specs[fi].path))
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        desc = f"tokenising -> {os.path.basename(out_dir)}" + (f" (rank 0 of {nranks})" if nranks > 1 else "")
        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=desc)

    def tasks():
        for fi in mine:
            spec = specs[fi]
            stats = ReadStats()
            docs = read_source(spec, subsets=subsets, text_key=text_key, stats=stats, skip_corrupt=skip_corrupt,
                               on_bytes=bar.update if bar else None)
            batch, size, name = [], 0, None
            try:
                for n, doc in enumerate(docs):
                    chunk = n // docs_per_shard
                    cur = _shard_name(fi, chunk)
                    if cur != name and batch:
                        yield name, batch
                        batch, size = [], 0
                    name = cur
                    if name in prog["shards"] or not owns(owners[fi], fi, chunk, rank, nranks):
                        continue
                    batch.append(doc)
                    size += len(doc)
                    if size >= BATCH_BYTES or len(batch) >= BATCH_DOCS:
                        yield name, batch
                        batch, size = [], 0
            except UserError as e:
                if batch:
                    yield name, batch
                yield _Stop(e)
                return
            if batch:
                yield name, batch
            yield _FileEnd(fi, stats)

    writer: IndexedShardWriter | None = None
    cur = {"name": None, "empty": 0}

    def finish_current():
        if writer is None:
            return
        ndocs, ntok = writer.finish()
        p = os.path.join(out_dir, cur["name"])
        prog["shards"][cur["name"]] = {"docs": ndocs, "tokens": ntok, "empty": cur["empty"],
                                       "bin_bytes": os.path.getsize(p + ".bin"), "idx_bytes": os.path.getsize(p + ".idx"),
                                       "bin_sample_sha256": identity(p + ".bin")["sample_sha256"],
                                       "idx_sample_sha256": identity(p + ".idx")["sample_sha256"]}
        _atomic_json(prog_path, prog)

    # spawned, not forked: a forked worker starts with a copy of whatever this process holds (its Python
    # signal handlers, locks that other threads held at the fork), so a parent with a SIGTERM handler of
    # its own (a test runner, a trainer) can get a worker deaf to Pool.terminate and wait for it forever
    pool = mp.get_context("spawn").Pool(workers, _init_pool_worker, (tokenizer_path,)) if workers > 1 else None
    if pool is None:
        _init_worker(tokenizer_path)
    n_tokens = 0
    pending: collections.deque = collections.deque()
    source = tasks()
    try:
        while True:
            while len(pending) < 4 * max(workers, 1):  # bounded read-ahead
                item = next(source, None)
                if item is None:
                    break
                if isinstance(item, (_FileEnd, _Stop)):
                    pending.append(item)
                else:
                    pending.append(pool.apply_async(encode_batch, (item,)) if pool else encode_batch(item))
            if not pending:
                break
            item = pending.popleft()
            if isinstance(item, _Stop):
                # The shard in progress is kept only if it already holds all its documents.
                if writer is not None and writer.num_docs + cur["empty"] == docs_per_shard:
                    finish_current()
                elif writer is not None:
                    writer.abort()
                writer = None
                log.info("%s: stopped; %d finished shards kept (a rerun continues from them)", out_dir,
                         len(_finished_shards(out_dir, prog)))
                raise item.error
            if isinstance(item, _FileEnd):
                finish_current()
                writer, cur["name"] = None, None
                s = item.stats
                prog["files"][str(item.file_idx)] = {
                    "sha256": s.sha256, "docs": s.docs, "skipped_corrupt": s.skipped_corrupt,
                    "skipped_bytes": s.skipped_bytes, "undecodable_bytes": s.undecodable_bytes,
                    "corrupt_regions": s.corrupt_regions, "filtered": s.filtered, "truncated": s.truncated,
                    "surrogates": s.surrogates, "surrogate_docs": s.surrogate_docs, "set_names": s.set_names,
                    "errors": s.first_errors}
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
        finish_current()
        writer = None
        if pool is not None:  # done: the workers leave on the pool's own sentinels, no signal involved
            pool.close()
            pool.join()
            pool = None
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        if pool is not None:
            pool.terminate()
        if bar is not None:
            bar.close()
    return n_tokens


SUMMED = ("skipped_corrupt", "skipped_bytes", "undecodable_bytes", "corrupt_regions", "filtered", "surrogates",
          "surrogate_docs")


def _manifest(specs, prog, fingerprint, tok, dtype, command, subsets) -> dict:
    shards, sources = [], []
    for name in sorted(prog["shards"]):
        r = prog["shards"][name]
        if r["docs"]:
            shards.append({"prefix": name, "docs": r["docs"], "tokens": r["tokens"], "input": int(name[5:10]),
                           "bin_bytes": r["bin_bytes"], "idx_bytes": r["idx_bytes"],
                           **{k: r[k] for k in ("bin_sample_sha256", "idx_sample_sha256") if k in r}})
    seen: dict = {}
    for fi, spec in enumerate(specs):
        f = prog["files"][str(fi)]
        empty = sum(r["empty"] for n, r in prog["shards"].items() if int(n[5:10]) == fi)
        sources.append({"kind": spec.kind, "path": os.path.abspath(spec.path),
                        "identity": fingerprint["inputs"][fi]["identity"], **f, "empty_docs": empty})
        for k, v in f.get("set_names", {}).items():
            seen[k] = seen.get(k, 0) + v
    warnings = subset_names.unmatched(subsets, seen)
    warnings += [f"input {s['path']} gave no document" for s in sources if s["docs"] == 0]
    return {
        "format": FORMAT, "fingerprint": fingerprint, "command": command, "tokenizer": tok, "dtype": dtype.name,
        "documents": sum(s["docs"] for s in shards), "tokens": sum(s["tokens"] for s in shards),
        **{k: sum(s.get(k, 0) for s in sources) for k in SUMMED},
        "empty_docs": sum(s["empty_docs"] for s in sources),
        "truncated_inputs": [s["path"] for s in sources if s["truncated"]],
        "set_names": seen, "warnings": warnings, "shards": shards, "sources": sources,
    }


def _nothing_message(man: dict, subsets) -> str:
    parts = [f"no documents in {len(man['sources'])} input(s)"]
    if subsets and man["set_names"]:
        parts += subset_names.unmatched(subsets, man["set_names"])
    elif subsets:
        parts.append("no record has a meta.pile_set_name, so --pile-subset matches nothing")
    if man["filtered"]:
        parts.append(f"{man['filtered']} records were filtered out by --pile-subset")
    if man["skipped_corrupt"]:
        parts.append(f"{man['skipped_corrupt']} were dropped as corrupt (first: {_first_error(man)})")
    if man["empty_docs"]:
        parts.append(f"{man['empty_docs']} documents were empty")
    return "; ".join(parts)


def _first_error(man: dict) -> str:
    return next((e for s in man["sources"] for e in s.get("errors", [])), "?")


def summary_lines(man: dict) -> list[str]:
    """What a run dropped, replaced and warns about, for the console."""
    out = []
    if man.get("skipped_corrupt") or man.get("undecodable_bytes") or man.get("truncated_inputs"):
        parts = [f"{man['skipped_corrupt']} corrupt records/documents dropped ({man['skipped_bytes']:,} bytes)"]
        if man.get("corrupt_regions"):
            parts.append(f"{man['undecodable_bytes']:,} undecodable compressed bytes in {man['corrupt_regions']} "
                         "region(s) skipped")
        if man.get("truncated_inputs"):
            parts.append(f"{len(man['truncated_inputs'])} input(s) truncated: " + ", ".join(man["truncated_inputs"]))
        out.append("skipped (--skip-corrupt): " + "; ".join(parts))
        errors = [e for s in man["sources"] for e in s.get("errors", [])]
        out += [f"  {e}" for e in errors[:5]] + ([f"  ... {len(errors) - 5} more in the manifest"] if len(errors) > 5 else [])
    else:
        out.append("corrupt input: none")
    if man.get("surrogates"):
        out.append(f"replaced {man['surrogates']} lone surrogate(s) with U+FFFD in {man['surrogate_docs']} document(s)")
    out += [f"warning: {w}" for w in man.get("warnings", [])]
    return out


def main(argv=None) -> int:
    from molm_ds import cli
    from data_prep.options import positive_int

    p = cli.ArgumentParser(prog="python -m data_prep.build_shards", description=__doc__)
    p.add_argument("--input", action="append", required=True, metavar="KIND:PATH",
                   help="corpus file(s), glob allowed (quote it); KIND: pile, cc100, jsonl, text, lines, hf")
    p.add_argument("--tokenizer", required=True, help="SentencePiece .model (from data_prep.train_tokenizer or existing)")
    p.add_argument("--out", required=True, help="output shard directory (give it to the loader as a DataSource)")
    p.add_argument("--workers", type=positive_int, default=os.cpu_count() or 1,
                   help="tokenising processes (of each rank under mpirun/srun)")
    p.add_argument("--docs-per-shard", type=positive_int, default=100_000, help="documents per shard file (resume unit)")
    p.add_argument("--pile-subset", action="append", help="keep only records with this meta.pile_set_name (repeat)")
    p.add_argument("--text-key", default="text", help="text field for jsonl and hf inputs")
    p.add_argument("--skip-corrupt", action="store_true", help="drop and count corrupt input instead of stopping")
    p.add_argument("--overwrite", action="store_true", help="discard an existing output built with other settings")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    from molm_ds.log import setup_logging

    setup_logging()
    t0 = time.perf_counter()
    specs = expand_inputs(a.input)
    # as typed (globs and all), run from here: what the loader tells a user to rerun to finish the directory
    command = f"cd {shlex.quote(os.getcwd())} && " + shlex.join(
        ["python", "-m", "data_prep.build_shards", *(sys.argv[1:] if argv is None else argv)])
    from molm_ds.storage import guarded_write

    ranks = ranks_mod.detect()
    stats: dict = {}
    # a full disk: one line; finished shards stay, *.tmp files are ignored and the same command resumes
    with guarded_write("shards to", a.out, after="rerun the same command after freeing space: it resumes"):
        man = build_shards(specs, a.tokenizer, a.out, workers=a.workers, docs_per_shard=a.docs_per_shard,
                           subsets=set(a.pile_subset) if a.pile_subset else None, text_key=a.text_key,
                           skip_corrupt=a.skip_corrupt, overwrite=a.overwrite, progress=not a.no_progress,
                           command=command, ranks=ranks, run_stats=stats)
    if ranks.rank != 0:
        return 0
    print(f"{a.out}: {len(man['shards'])} shards, {man['documents']} documents, {man['tokens']} tokens "
          f"({time.perf_counter() - t0:.1f}s)")
    for r in stats.get("per_rank", []):
        print(f"  rank {r['rank']} of {ranks.size}: {r['tokens']} tokens in {r['seconds']:.2f}s "
              f"({r['tokens'] / max(r['seconds'], 1e-9):,.0f} tokens/s) on {r['host']}")
    for line in summary_lines(man):
        print(line)
    return 0


if __name__ == "__main__":
    from molm_ds import cli

    cli.run(main)
