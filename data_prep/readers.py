"""Streaming corpus readers. Each yields documents (str) and never holds more than one document and
one decompression buffer in memory.

Formats
- ``pile``:  ``*.jsonl.zst`` (or .jsonl/.gz/.xz), one JSON object per line with ``text`` and
  ``meta.pile_set_name``; optional subset filter.
- ``cc100``: ``{lang}.txt.xz`` (or plain/.zst/.gz), documents separated by a blank line.
- ``jsonl``: one JSON object per line, the text under ``text_key``.
- ``text``:  one document per file.   ``lines``: one document per line.
- ``hf``:    a Hugging Face ``datasets`` directory saved with ``save_to_disk`` or data files
  (.parquet/.json/.jsonl/.csv/.txt) read with ``load_dataset(..., streaming=True)``.

Text is kept exactly as stored (NUL and other control characters included), except:
- a UTF-8 byte-order mark at the start of a file is dropped, and so is one opening a JSON line
  (files concatenated with their BOMs);
- CRLF line endings become LF in the line-based formats (inside JSON strings nothing changes);
- lone surrogates, which a JSON ``\\ud800`` escape can put into a Python string but UTF-8 cannot
  encode (so neither SentencePiece nor a shard can hold them), become U+FFFD and are counted
  (``ReadStats.surrogates`` characters in ``surrogate_docs`` documents).

Corrupt input (bad JSON, missing text, undecodable UTF-8, corrupt or truncated archive) raises
``CorruptInputError`` naming the file and line. With ``skip_corrupt=True`` it is dropped and counted
in ``reader.stats``: a bad line or record alone; for corrupt compressed data, the undecodable bytes
(decoding resumes at the next member that decodes, see ``data_prep.decompress``) and the records or
documents they cut through. Line numbers after such a gap count only the lines that could be decoded.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
from typing import Iterator

from data_prep.decompress import Decoder, Gap, codec_for
from molm_ds.errors import ConfigError, DataError
from molm_ds.log import get_logger

log = get_logger("data_prep.readers")

KINDS = ("pile", "cc100", "jsonl", "text", "lines", "hf")
BOM = b"\xef\xbb\xbf"
REPLACEMENT = "\ufffd"
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


class CorruptInputError(DataError):
    def __init__(self, path: str, line: int, why: str):
        super().__init__(f"{path}:{line}: {why} (rerun the same command with --skip-corrupt to skip and count "
                         "such input)")
        self.path, self.line, self.why = path, line, why


@dataclasses.dataclass
class ReadStats:
    docs: int = 0  # documents yielded
    skipped_corrupt: int = 0  # records / lines / documents dropped as corrupt (skip_corrupt=True)
    skipped_bytes: int = 0  # decompressed bytes of what was dropped
    undecodable_bytes: int = 0  # compressed bytes that could not be decoded
    corrupt_regions: int = 0  # stretches of corrupt compressed data
    filtered: int = 0  # records dropped by the subset filter
    truncated: bool = False  # the archive ended inside a member (skip_corrupt=True)
    surrogates: int = 0  # lone surrogates replaced by U+FFFD
    surrogate_docs: int = 0  # documents that held them
    set_names: dict = dataclasses.field(default_factory=dict)  # meta.pile_set_name -> records seen
    sha256: str | None = None  # of the raw (compressed) file, once fully read
    bytes_read: int = 0  # raw bytes read so far
    first_errors: list = dataclasses.field(default_factory=list)

    def dropped_anything(self) -> bool:
        return bool(self.skipped_corrupt or self.undecodable_bytes or self.truncated)


def replace_lone_surrogates(text: str, stats: ReadStats) -> str:
    """``text`` with every lone surrogate replaced by U+FFFD, counted in ``stats``."""
    fixed, n = _LONE_SURROGATE.subn(REPLACEMENT, text)
    if n:
        stats.surrogates += n
        stats.surrogate_docs += 1
    return fixed


def _strip_cr(line: bytes) -> bytes:
    return line[:-1] if line.endswith(b"\r") else line


class LineReader:
    """Raw lines with 1-based numbers from a possibly compressed file: ``(lineno, bytes, whole)``, the
    line ending removed (CRLF too). ``whole`` is False for a line that touches undecodable data: the part
    before a gap (possibly empty) and the first line after it, which may be the tail of a longer line.
    Hashes the raw bytes (``stats.sha256``) and reports raw progress through ``on_bytes``."""

    def __init__(self, path: str, stats: ReadStats, skip_corrupt: bool, on_bytes=None):
        self.path, self.stats, self.skip_corrupt, self.on_bytes = path, stats, skip_corrupt, on_bytes
        self.lineno = 0

    def _raw_progress(self, n: int) -> None:
        self.stats.bytes_read += n
        if self.on_bytes:
            self.on_bytes(n)

    def _gap(self, gap: Gap) -> None:
        if not self.skip_corrupt:
            raise CorruptInputError(self.path, self.lineno + 1, gap.why)
        s = self.stats
        if gap.truncated:
            s.truncated = True
            msg = gap.why
        else:
            s.corrupt_regions += 1
            s.undecodable_bytes += gap.nbytes
            msg = (f"{gap.why}: skipped compressed bytes {gap.start}..{gap.end} ({gap.nbytes} bytes), "
                   + ("resumed at the next member that decodes" if gap.resumed else "nothing after them decodes"))
        if len(s.first_errors) < 10:
            s.first_errors.append(f"{self.path}:{self.lineno + 1}: {msg}")

    def __iter__(self) -> Iterator[tuple[int, bytes, bool]]:
        dec = Decoder(self.path, recover=self.skip_corrupt, on_raw=self._raw_progress)
        buf, first, after_gap = b"", True, False
        for piece in dec:
            if isinstance(piece, Gap):
                self._gap(piece)
                if buf:
                    self.lineno += 1
                yield self.lineno, buf, False
                buf, after_gap, first = b"", True, False
                continue
            if first and piece:
                first = False
                if piece.startswith(BOM):
                    piece = piece[len(BOM):]
            buf += piece
            lines = buf.split(b"\n")
            buf = lines.pop()
            for line in lines:
                self.lineno += 1
                yield self.lineno, _strip_cr(line), not after_gap
                after_gap = False
        if buf:
            self.lineno += 1
            yield self.lineno, _strip_cr(buf), not after_gap
        self.stats.sha256 = dec.sha256

    def corrupt(self, lineno: int, why: str, nbytes: int = 0) -> None:
        """Raise, or count and remember (skip mode)."""
        if not self.skip_corrupt:
            raise CorruptInputError(self.path, lineno, why)
        self.stats.skipped_corrupt += 1
        self.stats.skipped_bytes += nbytes
        if len(self.stats.first_errors) < 10:
            self.stats.first_errors.append(f"{self.path}:{lineno}: {why}")

    def decode(self, lineno: int, raw: bytes) -> str | None:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            self.corrupt(lineno, f"undecodable UTF-8 ({e.reason} at byte {e.start})", len(raw))
            return None


CUT = "cut by corrupt compressed data"


def _keys_hint(rec) -> str:
    if not isinstance(rec, dict):
        return f"; the line holds a JSON {type(rec).__name__}, not an object"
    keys = ", ".join(repr(k) for k in list(rec)[:8])
    return f"; its keys: {keys} (choose the text field with --text-key)" if keys else ""


def read_json_records(path: str, *, text_key: str = "text", subsets: set[str] | None = None,
                      stats: ReadStats | None = None, skip_corrupt: bool = False, on_bytes=None) -> Iterator[str]:
    """Pile / JSONL: the ``text_key`` field of every record; with ``subsets``, only records whose
    ``meta.pile_set_name`` is in it. Every ``meta.pile_set_name`` seen is counted in ``stats.set_names``."""
    stats = stats if stats is not None else ReadStats()
    lines = LineReader(path, stats, skip_corrupt, on_bytes)
    for lineno, raw, whole in lines:
        if raw.startswith(BOM):
            raw = raw[len(BOM):]
        if not raw.strip():
            continue
        s = lines.decode(lineno, raw)
        if s is None:
            continue
        try:
            rec = json.loads(s)
        except json.JSONDecodeError as e:
            why = f"bad JSON ({e.msg} at column {e.colno})" if whole else f"line {CUT} (not valid JSON)"
            lines.corrupt(lineno, why, len(raw))
            continue
        text = rec.get(text_key) if isinstance(rec, dict) else None
        if not isinstance(text, str):
            lines.corrupt(lineno, f"record has no string field {text_key!r}{_keys_hint(rec)}", len(raw))
            continue
        meta = rec.get("meta")
        name = meta.get("pile_set_name") if isinstance(meta, dict) else None
        if isinstance(name, str):
            stats.set_names[name] = stats.set_names.get(name, 0) + 1
        if subsets is not None and name not in subsets:
            stats.filtered += 1
            continue
        # Fast path: an ASCII string (an O(1) test) holds no surrogate, and only a \uD800-\uDFFF escape in
        # the line can put one into the parsed text; the regex (the slow path) runs only past both.
        if not text.isascii() and ("\\ud" in s or "\\uD" in s):
            text = replace_lone_surrogates(text, stats)
        stats.docs += 1
        yield text


def read_blank_separated(path: str, *, stats: ReadStats | None = None, skip_corrupt: bool = False,
                         on_bytes=None) -> Iterator[str]:
    """CC-100: lines joined with "\\n"; a blank (or whitespace-only) line ends a document. A document
    that corrupt compressed data cuts through is dropped whole."""
    stats = stats if stats is not None else ReadStats()
    lines = LineReader(path, stats, skip_corrupt, on_bytes)
    doc: list[str] = []
    damaged, nbytes, lineno = False, 0, 0
    for lineno, raw, whole in lines:
        if not whole:
            damaged = damaged or bool(raw.strip() or doc)
            nbytes += len(raw)
            continue
        s = lines.decode(lineno, raw)
        if s is None:
            continue
        if s.strip():
            doc.append(s)
            nbytes += len(raw) + 1
        elif doc or damaged:
            if damaged:
                lines.corrupt(lineno, f"document {CUT}", nbytes)
            else:
                stats.docs += 1
                yield "\n".join(doc)
            doc, damaged, nbytes = [], False, 0
    if damaged:
        lines.corrupt(lineno, f"document {CUT}", nbytes)
    elif doc:
        stats.docs += 1
        yield "\n".join(doc)


def read_lines(path: str, *, stats: ReadStats | None = None, skip_corrupt: bool = False, on_bytes=None) -> Iterator[str]:
    """One document per non-empty line."""
    stats = stats if stats is not None else ReadStats()
    lines = LineReader(path, stats, skip_corrupt, on_bytes)
    for lineno, raw, whole in lines:
        if not whole:
            if raw.strip():
                lines.corrupt(lineno, f"line {CUT}", len(raw))
            continue
        s = lines.decode(lineno, raw)
        if s is not None and s.strip():
            stats.docs += 1
            yield s


def read_text_file(path: str, *, stats: ReadStats | None = None, skip_corrupt: bool = False, on_bytes=None) -> Iterator[str]:
    """The whole file as one document (CRLF normalised to LF). One file is held in memory. A file that
    corrupt compressed data cuts through is dropped."""
    stats = stats if stats is not None else ReadStats()
    lines = LineReader(path, stats, skip_corrupt, on_bytes)
    parts, damaged, nbytes, lineno = [], False, 0, 0
    for lineno, raw, whole in lines:
        nbytes += len(raw) + 1
        if not whole:
            damaged = True
            continue
        s = lines.decode(lineno, raw)
        if s is not None:
            parts.append(s)
    if damaged:
        lines.corrupt(lineno, f"document {CUT}", nbytes)
    elif parts:
        stats.docs += 1
        yield "\n".join(parts)


def read_hf(path: str, *, text_key: str = "text", split: str = "train", stats: ReadStats | None = None,
            skip_corrupt: bool = False, on_bytes=None) -> Iterator[str]:
    """A Hugging Face dataset saved with ``save_to_disk`` (memory-mapped Arrow), or data files streamed
    with ``load_dataset``. Rows without a string ``text_key`` are corrupt (row number as the line)."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"input hf:{path} needs the 'datasets' package: pip install datasets") from None

    stats = stats if stats is not None else ReadStats()
    if os.path.isdir(path):
        try:
            ds = datasets.load_from_disk(path)
        except FileNotFoundError as e:
            raise DataError(f"{path}: not a dataset saved with save_to_disk ({e})") from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"{path}: no split {split!r}; it has {list(ds)}")
            ds = ds[split]
    else:
        ds = datasets.load_dataset(hf_builder(path), data_files=path, split="train", streaming=True)
    for row_no, row in enumerate(ds, 1):
        text = row.get(text_key)
        if not isinstance(text, str):
            if not skip_corrupt:
                raise CorruptInputError(path, row_no, f"row has no string field {text_key!r}{_keys_hint(row)}")
            stats.skipped_corrupt += 1
            continue
        if not text.isascii():
            text = replace_lone_surrogates(text, stats)
        stats.docs += 1
        yield text
    stats.sha256 = None  # a dataset directory has no single checksum


def hf_builder(path: str) -> str:
    """The ``datasets`` builder for a data file, by suffix."""
    builder = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".txt": "text"}
    ext = next((b for e, b in builder.items() if path.endswith((e, e + ".gz", e + ".zst"))), None)
    if ext is None:
        raise ConfigError(f"input hf:{path}: unknown data-file type for datasets; use .parquet, .json(l), .csv "
                          "or .txt, or a save_to_disk directory")
    return ext


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """One input: ``kind`` (see KINDS) and a file path. Parsed from ``KIND:PATH`` on the command line."""

    kind: str
    path: str

    @classmethod
    def parse(cls, spec: str) -> "SourceSpec":
        kind, sep, path = spec.partition(":")
        if not sep or kind not in KINDS or not path:
            raise ConfigError(f"input {spec!r}: expected KIND:PATH with KIND one of {', '.join(KINDS)} "
                              "(e.g. pile:/data/pile/train/00.jsonl.zst, cc100:/data/cc100/sw.txt.xz)")
        return cls(kind, path)


def read_source(spec: SourceSpec, *, subsets: set[str] | None = None, text_key: str = "text",
                stats: ReadStats | None = None, skip_corrupt: bool = False, on_bytes=None) -> Iterator[str]:
    """Documents of one input file, dispatching on its kind."""
    kw = dict(stats=stats, skip_corrupt=skip_corrupt, on_bytes=on_bytes)
    if spec.kind == "pile":
        return read_json_records(spec.path, text_key="text", subsets=subsets, **kw)
    if spec.kind == "jsonl":
        return read_json_records(spec.path, text_key=text_key, **kw)
    if spec.kind == "cc100":
        return read_blank_separated(spec.path, **kw)
    if spec.kind == "lines":
        return read_lines(spec.path, **kw)
    if spec.kind == "text":
        return read_text_file(spec.path, **kw)
    if spec.kind == "hf":
        return read_hf(spec.path, text_key=text_key, **kw)
    raise ConfigError(f"unknown input kind {spec.kind!r}; one of {KINDS}")


def expand_inputs(specs: list[str]) -> list[SourceSpec]:
    """Parse ``KIND:PATH`` strings; PATH may be a glob (sorted). Missing files are an error, and so is a
    directory for any kind but ``hf``."""
    out = []
    for s in specs:
        spec = SourceSpec.parse(s)
        paths = sorted(glob.glob(spec.path)) if any(c in spec.path for c in "*?[") else [spec.path]
        missing = [p for p in paths if not os.path.exists(p)]
        if not paths or missing:
            raise DataError(f"input {s!r}: " + (f"no such file {missing[0]}" if missing else "no file matches"))
        for p in paths:
            if os.path.isdir(p) and spec.kind != "hf":
                raise DataError(f"input {spec.kind}:{p} is a directory; give its files (a quoted glob such as "
                                f"'{spec.kind}:{os.path.join(p, '*')}') or use hf: for a saved dataset")
            if spec.kind == "hf" and not os.path.isdir(p):
                hf_builder(p)
        out.extend(SourceSpec(spec.kind, p) for p in paths)
    return out


def check_inputs(specs: list[SourceSpec], skip_corrupt: bool) -> None:
    """Refuse, before any work, inputs that cannot give a document: all of them empty, or a 0-byte archive
    (a compressed file holds at least one member; with ``skip_corrupt`` it is only logged, then counted)."""
    sizes = [None if os.path.isdir(s.path) else os.path.getsize(s.path) for s in specs]
    for s, size in zip(specs, sizes):
        if size == 0 and codec_for(s.path) is not None:
            msg = f"input {s.kind}:{s.path} is an empty file, not a compressed archive"
            if not skip_corrupt:
                raise DataError(f"{msg}; remove it from --input, or pass --skip-corrupt to count and skip it")
            log.warning("%s; it will be counted as truncated (--skip-corrupt)", msg)
    if specs and all(size == 0 for size in sizes):
        raise DataError("every input is an empty file (0 bytes): " + ", ".join(s.path for s in specs[:5])
                        + (" ..." if len(specs) > 5 else ""))
