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

Corrupt input (bad JSON, missing text, undecodable UTF-8, truncated archive) raises
``CorruptInputError`` naming the file and line, or with ``skip_corrupt=True`` is skipped and counted
in ``reader.stats`` (a truncated archive ends that file).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import lzma
import os
import zlib
from typing import Callable, Iterator

import zstandard

CHUNK = 1 << 20
KINDS = ("pile", "cc100", "jsonl", "text", "lines", "hf")


class CorruptInputError(ValueError):
    def __init__(self, path: str, line: int, why: str):
        super().__init__(f"{path}:{line}: {why} (pass --skip-corrupt to skip and count such input)")
        self.path, self.line, self.why = path, line, why


@dataclasses.dataclass
class ReadStats:
    docs: int = 0  # documents yielded
    skipped_corrupt: int = 0  # corrupt lines / records skipped (skip_corrupt=True)
    filtered: int = 0  # records dropped by the subset filter
    truncated: bool = False  # the archive ended early (skip_corrupt=True)
    sha256: str | None = None  # of the raw (compressed) file, once fully read
    bytes_read: int = 0  # raw bytes read so far
    first_errors: list = dataclasses.field(default_factory=list)


def _multi_member(new: Callable[[], object]):
    """(feed, finished) over a stream of concatenated members (zstd frames, xz streams, gzip members;
    the Pile's files may hold several): ``new()`` makes a decompressor for the next member once one ends.
    finished() is True between members, i.e. when the input did not stop inside one."""
    state = {"d": new(), "fed": False}

    def feed(b: bytes) -> bytes:
        out = []
        while b:
            d = state["d"]
            state["fed"] = True
            out.append(d.decompress(b))
            b = d.unused_data if d.eof else b""
            if d.eof:
                state["d"], state["fed"] = new(), False
        return b"".join(out)

    return feed, lambda: not state["fed"]


def _decompressor(path: str):
    """(feed(bytes) -> bytes, finished() -> bool) for the file's compression, chosen by suffix."""
    if path.endswith(".zst"):
        return _multi_member(lambda: zstandard.ZstdDecompressor().decompressobj())
    if path.endswith(".xz"):
        return _multi_member(lzma.LZMADecompressor)
    if path.endswith(".gz"):
        return _multi_member(lambda: zlib.decompressobj(wbits=31))
    return (lambda b: b), (lambda: True)


class LineReader:
    """Raw lines (bytes, line ending removed, CRLF too) with 1-based numbers, from a possibly
    compressed file. Hashes the raw bytes and reports raw progress through ``on_bytes``."""

    def __init__(self, path: str, stats: ReadStats, skip_corrupt: bool, on_bytes: Callable[[int], None] | None = None):
        self.path, self.stats, self.skip_corrupt, self.on_bytes = path, stats, skip_corrupt, on_bytes
        self.lineno = 0

    def _chunks(self) -> Iterator[bytes]:
        feed, finished = _decompressor(self.path)
        h = hashlib.sha256()
        with open(self.path, "rb") as f:
            while True:
                raw = f.read(CHUNK)
                if not raw:
                    break
                h.update(raw)
                self.stats.bytes_read += len(raw)
                if self.on_bytes:
                    self.on_bytes(len(raw))
                try:
                    out = feed(raw)
                except (zstandard.ZstdError, lzma.LZMAError, zlib.error, EOFError) as e:
                    self._truncated(f"corrupt compressed data ({e})")
                    return
                if out:
                    yield out
        if not finished():
            self._truncated("truncated archive: the compressed stream ends before its end marker")
            return
        self.stats.sha256 = h.hexdigest()

    def _truncated(self, why: str) -> None:
        if not self.skip_corrupt:
            raise CorruptInputError(self.path, self.lineno + 1, why)
        self.stats.truncated = True
        self.stats.first_errors.append(f"{self.path}:{self.lineno + 1}: {why}")

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        buf = b""
        for chunk in self._chunks():
            buf += chunk
            lines = buf.split(b"\n")
            buf = lines.pop()
            for line in lines:
                self.lineno += 1
                yield self.lineno, line[:-1] if line.endswith(b"\r") else line
        if buf and not self.stats.truncated:
            self.lineno += 1
            yield self.lineno, buf[:-1] if buf.endswith(b"\r") else buf

    def corrupt(self, lineno: int, why: str) -> None:
        """Raise, or count and remember (skip mode)."""
        if not self.skip_corrupt:
            raise CorruptInputError(self.path, lineno, why)
        self.stats.skipped_corrupt += 1
        if len(self.stats.first_errors) < 10:
            self.stats.first_errors.append(f"{self.path}:{lineno}: {why}")

    def decode(self, lineno: int, raw: bytes) -> str | None:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            self.corrupt(lineno, f"undecodable UTF-8 ({e.reason} at byte {e.start})")
            return None


def read_json_records(path: str, *, text_key: str = "text", subsets: set[str] | None = None,
                      stats: ReadStats | None = None, skip_corrupt: bool = False, on_bytes=None) -> Iterator[str]:
    """Pile / JSONL: the ``text_key`` field of every record; with ``subsets``, only records whose
    ``meta.pile_set_name`` is in it."""
    stats = stats if stats is not None else ReadStats()
    lines = LineReader(path, stats, skip_corrupt, on_bytes)
    for lineno, raw in lines:
        if not raw.strip():
            continue
        s = lines.decode(lineno, raw)
        if s is None:
            continue
        try:
            rec = json.loads(s)
        except json.JSONDecodeError as e:
            lines.corrupt(lineno, f"bad JSON ({e.msg} at column {e.colno})")
            continue
        text = rec.get(text_key) if isinstance(rec, dict) else None
        if not isinstance(text, str):
            lines.corrupt(lineno, f"record has no string field {text_key!r}")
            continue
        if subsets is not None:
            meta = rec.get("meta")
            name = meta.get("pile_set_name") if isinstance(meta, dict) else None
            if name not in subsets:
                stats.filtered += 1
                continue
        stats.docs += 1
        yield text


def read_blank_separated(path: str, *, stats: ReadStats | None = None, skip_corrupt: bool = False,
                         on_bytes=None) -> Iterator[str]:
    """CC-100: lines joined with "\\n"; a blank (or whitespace-only) line ends a document."""
    stats = stats if stats is not None else ReadStats()
    lines = LineReader(path, stats, skip_corrupt, on_bytes)
    doc: list[str] = []
    for lineno, raw in lines:
        s = lines.decode(lineno, raw)
        if s is None:
            continue
        if s.strip():
            doc.append(s)
        elif doc:
            stats.docs += 1
            yield "\n".join(doc)
            doc = []
    if doc:
        stats.docs += 1
        yield "\n".join(doc)


def read_lines(path: str, *, stats: ReadStats | None = None, skip_corrupt: bool = False, on_bytes=None) -> Iterator[str]:
    """One document per non-empty line."""
    stats = stats if stats is not None else ReadStats()
    lines = LineReader(path, stats, skip_corrupt, on_bytes)
    for lineno, raw in lines:
        s = lines.decode(lineno, raw)
        if s is not None and s.strip():
            stats.docs += 1
            yield s


def read_text_file(path: str, *, stats: ReadStats | None = None, skip_corrupt: bool = False, on_bytes=None) -> Iterator[str]:
    """The whole file as one document (CRLF normalised to LF). One file is held in memory."""
    stats = stats if stats is not None else ReadStats()
    lines = LineReader(path, stats, skip_corrupt, on_bytes)
    parts = []
    for lineno, raw in lines:
        s = lines.decode(lineno, raw)
        if s is not None:
            parts.append(s)
    if parts:
        stats.docs += 1
        yield "\n".join(parts)


def read_hf(path: str, *, text_key: str = "text", split: str = "train", stats: ReadStats | None = None,
            skip_corrupt: bool = False, on_bytes=None) -> Iterator[str]:
    """A Hugging Face dataset saved with ``save_to_disk`` (memory-mapped Arrow), or data files streamed
    with ``load_dataset``. Rows without a string ``text_key`` are corrupt (row number as the line)."""
    import datasets

    stats = stats if stats is not None else ReadStats()
    if os.path.isdir(path):
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"{path}: no split {split!r}; it has {list(ds)}")
            ds = ds[split]
    else:
        builder = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".txt": "text"}
        ext = next((b for e, b in builder.items() if path.endswith(e) or path.endswith(e + ".gz")
                    or path.endswith(e + ".zst")), None)
        if ext is None:
            raise ValueError(f"{path}: unknown data-file type for datasets; use .parquet, .json(l), .csv or .txt")
        ds = datasets.load_dataset(ext, data_files=path, split="train", streaming=True)
    for row_no, row in enumerate(ds, 1):
        text = row.get(text_key)
        if not isinstance(text, str):
            if not skip_corrupt:
                raise CorruptInputError(path, row_no, f"row has no string field {text_key!r}")
            stats.skipped_corrupt += 1
            continue
        stats.docs += 1
        yield text
    stats.sha256 = None  # a dataset directory has no single checksum


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """One input: ``kind`` (see KINDS) and a file path. Parsed from ``KIND:PATH`` on the command line."""

    kind: str
    path: str

    @classmethod
    def parse(cls, spec: str) -> "SourceSpec":
        kind, sep, path = spec.partition(":")
        if not sep or kind not in KINDS:
            raise ValueError(f"input {spec!r}: expected KIND:PATH with KIND one of {', '.join(KINDS)} "
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
    raise ValueError(f"unknown input kind {spec.kind!r}; one of {KINDS}")


def expand_inputs(specs: list[str]) -> list[SourceSpec]:
    """Parse ``KIND:PATH`` strings; PATH may be a glob (sorted). Missing files are an error."""
    import glob

    out = []
    for s in specs:
        spec = SourceSpec.parse(s)
        paths = sorted(glob.glob(spec.path)) if any(c in spec.path for c in "*?[") else [spec.path]
        if not paths or not all(os.path.exists(p) for p in paths):
            raise FileNotFoundError(f"input {s!r}: no such file(s)")
        out.extend(SourceSpec(spec.kind, p) for p in paths)
    return out
