"""Finding shards and reading the manifests that data_prep writes.

A *source path* given to the loader is one of
- a shard directory written by ``python -m data_prep.build_shards``: ``manifest.json`` (written last,
  so its presence means the build finished) and ``part-*.bin/.idx``; the manifest fixes the shard
  order and every shard file's size, which are checked before any read. A directory that
  ``build_shards`` started but did not finish (``progress.json``, or its ``part-FFFFF-CCCCC`` files,
  without a manifest) is refused with the command that finishes it;
- any other directory of Megatron ``*.idx``/``*.bin`` pairs without a manifest (sorted by name; the
  tokenizer and sizes cannot be checked, which is logged), or
- a single Megatron prefix (``PREFIX.bin`` + ``PREFIX.idx``); inside a shard directory, its entry in
  the manifest applies.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re

from molm_ds.data.indexed import HEADER_BYTES
from molm_ds.errors import DataError
from molm_ds.log import warn_once

MANIFEST = "manifest.json"
PROGRESS = "progress.json"  # build_shards' record of a build in progress
FORMATS = (1, 2)  # manifest formats this loader reads (1: no file sizes, derived from docs and tokens)
BUILT_NAME = re.compile(r"part-\d{5}-\d{5}\.(bin|idx)(\.tmp)?$")
ITEMSIZE = {"uint16": 2, "int32": 4}
BUILD_HELP = "python -m data_prep.build_shards (see docs/data.md)"


def _load_json(file: str) -> dict:
    try:
        with open(file) as f:
            man = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{file} cannot be read as JSON ({e}); rebuild the directory with {BUILD_HELP}") from None
    if not isinstance(man, dict):
        raise DataError(f"{file} is not a data_prep manifest (not a JSON object)")
    return man


def unfinished_error(directory: str) -> DataError:
    """The refusal for a shard directory that build_shards did not finish, with the command that finishes it."""
    prog_file = os.path.join(directory, PROGRESS)
    command = None
    if os.path.isfile(prog_file):
        try:
            with open(prog_file) as f:
                prog = json.load(f)
            done = sum(1 for r in prog.get("shards", {}).values() if r.get("docs"))
            command = prog.get("command")
        except (OSError, json.JSONDecodeError, AttributeError):
            done = "some"
        what = f"an unfinished build_shards output ({done} shards done, {PROGRESS} present, no {MANIFEST})"
    else:
        what = f"shard files from build_shards but no {MANIFEST} (the build did not finish)"
    how = f"rerun the command that built it: {command}" if command else f"rerun the build_shards command ({BUILD_HELP})"
    return DataError(f"{directory} holds {what}; training on it would use only part of the data. To finish it, "
                     f"{how} (it resumes from the finished shards)")


def _looks_unfinished(directory: str) -> bool:
    if os.path.exists(os.path.join(directory, PROGRESS)):
        return True
    return any(BUILT_NAME.match(n) for n in os.listdir(directory))


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of a shard directory, of an embedded-corpus directory, or a manifest file itself."""
    path = os.fspath(path)
    file = path if path.endswith(".json") else os.path.join(path, MANIFEST)
    if not os.path.isfile(file):
        if os.path.isdir(path) and _looks_unfinished(path):
            raise unfinished_error(path)
        raise DataError(f"{file} not found: expected a directory written by data_prep "
                        "(python -m data_prep.build_shards or python -m data_prep.embedded)")
    return _load_json(file)


def _need(cond: bool, file: str, what: str) -> None:
    if not cond:
        raise DataError(f"{file} is incomplete: {what}; rebuild the directory with {BUILD_HELP}")


def check_tokenizer_entry(tok, file: str) -> None:
    _need(isinstance(tok, dict), file, "no 'tokenizer' entry")
    for key in ("vocab_size", "eos_id", "bos_id", "pad_id", "unk_id"):
        _need(isinstance(tok.get(key), int), file, f"tokenizer.{key} is missing")
    sha = tok.get("sha256")
    _need(isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha) is not None, file,
          "tokenizer.sha256 (the hash that tells tokenizers apart) is missing")


def check_shard_manifest(man: dict, file: str) -> None:
    """DataError unless ``man`` is a complete shard manifest: a known format, the tokenizer, the dtype and
    every shard with its documents and tokens."""
    if "shards" not in man:
        raise DataError(f"{file} is not a shard manifest (no 'shards'); for an embedded corpus directory pass "
                        "DIR/shards/<domain>")
    _need(man.get("format") in FORMATS, file, f"format {man.get('format')!r} is not one of {FORMATS}")
    check_tokenizer_entry(man.get("tokenizer"), file)
    _need(man.get("dtype") in ITEMSIZE, file, f"dtype {man.get('dtype')!r} is not one of {sorted(ITEMSIZE)}")
    _need(isinstance(man["shards"], list) and len(man["shards"]) > 0, file, "it lists no shard")
    for s in man["shards"]:
        _need(isinstance(s, dict) and isinstance(s.get("prefix"), str), file, f"shard entry {s!r} has no prefix")
        for key in ("docs", "tokens"):
            _need(isinstance(s.get(key), int), file, f"shard {s['prefix']} has no {key!r} count")


@dataclasses.dataclass(frozen=True)
class ShardEntry:
    """One shard of a source, with the file sizes its manifest promises (None: no manifest)."""

    prefix: str
    bin_bytes: int | None = None
    idx_bytes: int | None = None
    bin_sample_sha256: str | None = None  # data_prep.identity's sampled hash, when the manifest records it
    idx_sample_sha256: str | None = None


def _entry(directory: str, s: dict, dtype: str) -> ShardEntry:
    bin_bytes = s.get("bin_bytes", s["tokens"] * ITEMSIZE[dtype])
    idx_bytes = s.get("idx_bytes", HEADER_BYTES + 12 * s["docs"] + 8 * (s["docs"] + 1))
    return ShardEntry(os.path.join(directory, s["prefix"]), bin_bytes, idx_bytes,
                      s.get("bin_sample_sha256"), s.get("idx_sample_sha256"))


def _manifest_entries(directory: str) -> list[ShardEntry]:
    file = os.path.join(directory, MANIFEST)
    man = _load_json(file)
    check_shard_manifest(man, file)
    return [_entry(directory, s, man["dtype"]) for s in man["shards"]]


def source_shards(path: str | os.PathLike) -> list[ShardEntry]:
    """The shards (prefix without .bin/.idx, promised sizes) that make up one data source, in order.
    Raises DataError for an unfinished or incomplete shard directory and a path that is not a source."""
    path = os.fspath(path)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, MANIFEST)):
            return _manifest_entries(path)
        if _looks_unfinished(path):
            raise unfinished_error(path)
        prefixes = sorted(p[:-4] for p in glob.glob(os.path.join(path, "*.idx")))
        if not prefixes:
            raise DataError(f"{path}: no {MANIFEST} and no *.idx shards in this directory")
        warn_once(f"{path} has no {MANIFEST}: read as plain Megatron shards in name order; their sizes and "
                  "tokenizer cannot be checked")
        return [ShardEntry(p) for p in prefixes]
    if os.path.exists(path + ".idx"):
        parent = os.path.dirname(path) or "."
        if os.path.isfile(os.path.join(parent, MANIFEST)):
            mine = [e for e in _manifest_entries(parent) if os.path.abspath(e.prefix) == os.path.abspath(path)]
            if mine:
                return mine
        elif os.path.exists(os.path.join(parent, PROGRESS)):
            raise unfinished_error(parent)
        return [ShardEntry(path)]
    raise DataError(f"{path}: neither a shard directory nor a prefix with {path}.idx/.bin")


def shard_prefixes(path: str | os.PathLike) -> list[str]:
    """The shard prefixes (without .bin/.idx) that make up one data source, in order."""
    return [e.prefix for e in source_shards(path)]


def check_shard_files(entries: list[ShardEntry]) -> None:
    """DataError when a shard file is missing, its size differs from what the manifest promises, or its
    bytes no longer give the sampled hash the manifest recorded (``data_prep.identity``: about 1 MiB read
    per file, the whole file when it is smaller)."""
    for e in entries:
        for ext, want, digest in ((".bin", e.bin_bytes, e.bin_sample_sha256), (".idx", e.idx_bytes, e.idx_sample_sha256)):
            f = e.prefix + ext
            if not os.path.isfile(f):
                raise DataError(f"{f} is missing: an indexed shard is a prefix with both .bin and .idx files"
                                + ("; the manifest lists it, so the directory was changed after the build: rebuild "
                                   f"it with {BUILD_HELP}" if want is not None else ""))
            if want is not None and os.path.getsize(f) != want:
                raise DataError(f"{f} is {os.path.getsize(f)} bytes but the manifest says {want}: the shard was "
                                f"changed or damaged after the build; rebuild the directory with {BUILD_HELP}")
            if digest is not None:
                from data_prep.identity import identity

                if identity(f)["sample_sha256"] != digest:
                    raise DataError(f"{f} does not hold the bytes the manifest recorded (its sampled sha256 differs): "
                                    f"the shard was overwritten or damaged after the build; rebuild the directory "
                                    f"with {BUILD_HELP}")


@dataclasses.dataclass(frozen=True)
class TokenizerInfo:
    vocab_size: int
    eos_id: int
    bos_id: int
    pad_id: int
    unk_id: int
    model_path: str | None
    sha256: str | None


def tokenizer_info(path: str | os.PathLike) -> TokenizerInfo:
    """Vocabulary size and special-token ids of the tokenizer behind some data.

    ``path``: a shard directory, an embedded-corpus directory (``DIR`` of ``data_prep.embedded``),
    a manifest file, or a SentencePiece ``.model`` file. A shard directory must be complete.
    """
    path = os.fspath(path)
    if path.endswith(".model"):
        return _model_info(path)
    man = read_manifest(path)
    file = path if path.endswith(".json") else os.path.join(path, MANIFEST)
    if "shards" in man:
        check_shard_manifest(man, file)
    tok = man.get("tokenizer")
    check_tokenizer_entry(tok, file)
    model = tok.get("model_path")
    if model and not os.path.isabs(model):
        base = path if os.path.isdir(path) else os.path.dirname(path)
        model = os.path.normpath(os.path.join(base, model))
    return TokenizerInfo(int(tok["vocab_size"]), int(tok["eos_id"]), int(tok["bos_id"]), int(tok["pad_id"]),
                         int(tok["unk_id"]), model, tok.get("sha256"))


def _model_info(path: str) -> TokenizerInfo:
    import sentencepiece as spm
    from hashlib import sha256

    if not os.path.isfile(path):
        raise DataError(f"tokenizer {path}: no such file")
    try:
        sp = spm.SentencePieceProcessor(model_file=path)
    except (RuntimeError, OSError) as e:
        raise DataError(f"tokenizer {path} is not a SentencePiece model ({' '.join(str(e).split())})") from None
    with open(path, "rb") as f:
        digest = sha256(f.read()).hexdigest()
    return TokenizerInfo(sp.vocab_size(), sp.eos_id(), sp.bos_id(), sp.pad_id(), sp.unk_id(),
                         os.path.abspath(path), digest)
