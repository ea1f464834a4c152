"""Decompressing one corpus file, member by member, with recovery from corrupt data.

A compressed corpus file may hold several members back to back (zstd frames, xz streams, gzip
members; the Pile's files may hold several). ``Decoder(path, recover=...)`` yields the decompressed
bytes in order and a ``Gap`` wherever the raw file could not be decoded:

- corrupt data: without ``recover`` the first ``Gap`` ends the stream (the caller raises). With it,
  the damaged member is decoded again from its start in small slices, so every block that decodes
  before the damage is kept; then decoding resumes at the next position where a member's magic
  bytes start a member that decodes (``probe``). Data inside the damaged member after the damage
  cannot be recovered (its blocks depend on what came before), and with one member per file
  (``zstd FILE``, ``xz FILE``) that is the rest of the file.
- truncation: the file ends inside a member; a ``Gap`` with ``truncated=True`` and no bytes.

xz and gzip check their checksums only at the end of a block or member, so text decoded from damaged
data just before the check fails has already been passed on; it usually fails UTF-8 or JSON in the
readers and is dropped there as a corrupt line.

Every raw byte is hashed exactly once, in file order (``sha256``), and reported once to ``on_raw``
(the progress bar), however often recovery reads it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import lzma
import os
import zlib
from typing import Callable, Iterator

import zstandard

CHUNK = 1 << 20  # raw bytes per read on the normal path
SLICE = 1 << 10  # raw bytes per decompress call while salvaging or probing
LOOKBACK = 1 << 17  # a member may start up to one zstd block (128 KiB) before its predecessor's error shows
PROBE = 1 << 18  # a resync candidate must decode this much raw input (or reach its end) without an error


@dataclasses.dataclass(frozen=True)
class Codec:
    name: str
    new: Callable[[], object]  # a decompressor with decompress(), eof, unused_data
    magic: bytes  # how a member starts
    errors: tuple  # what a decompressor raises on bad data
    padding: bytes = b""  # bytes allowed between members (xz stream padding)


CODECS = {
    ".zst": Codec("zstd frame", lambda: zstandard.ZstdDecompressor().decompressobj(), b"\x28\xb5\x2f\xfd",
                  (zstandard.ZstdError,)),
    ".xz": Codec("xz stream", lzma.LZMADecompressor, b"\xfd7zXZ\x00", (lzma.LZMAError, EOFError), b"\x00"),
    ".gz": Codec("gzip member", lambda: zlib.decompressobj(wbits=31), b"\x1f\x8b\x08", (zlib.error,)),
}


def codec_for(path: str) -> Codec | None:
    """The codec chosen by the file's suffix; None for an uncompressed file."""
    return next((c for suffix, c in CODECS.items() if path.endswith(suffix)), None)


@dataclasses.dataclass(frozen=True)
class Gap:
    """Raw bytes [start, end) that could not be decoded (``end`` is the file size when nothing after
    them decoded). ``start`` is where the last decodable data ended, to within one slice."""

    start: int
    end: int
    why: str
    truncated: bool = False
    resumed: bool = False  # decoding went on at ``end`` with the next member

    @property
    def nbytes(self) -> int:
        return self.end - self.start


class _RawFile:
    """Reads at any offset; hashes each byte once, in order, and reports each new byte once."""

    def __init__(self, f, size: int, on_raw: Callable[[int], None] | None):
        self.f, self.size, self.on_raw = f, size, on_raw
        self.hash, self.done = hashlib.sha256(), 0

    def read(self, offset: int, n: int) -> bytes:
        if offset > self.done:
            self._account_to(offset)
        self.f.seek(offset)
        data = self.f.read(n)
        end = offset + len(data)
        if end > self.done:
            self._account(data[self.done - offset:])
        return data

    def _account(self, new: bytes) -> None:
        self.hash.update(new)
        self.done += len(new)
        if self.on_raw and new:
            self.on_raw(len(new))

    def _account_to(self, offset: int) -> None:
        while self.done < offset:
            self.f.seek(self.done)
            block = self.f.read(min(CHUNK, offset - self.done))
            if not block:
                break
            self._account(block)

    def sha256(self) -> str:
        self._account_to(self.size)
        return self.hash.hexdigest()


class Decoder:
    """Iterate for decompressed ``bytes`` pieces and ``Gap`` markers; ``sha256`` of the raw file is set
    once iteration ends. Uncompressed files are passed through in chunks."""

    def __init__(self, path: str, *, recover: bool, on_raw: Callable[[int], None] | None = None):
        self.path, self.recover, self.on_raw = path, recover, on_raw
        self.codec = codec_for(path)
        self.sha256: str | None = None

    def __iter__(self) -> Iterator[bytes | Gap]:
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            raw = _RawFile(f, size, self.on_raw)
            if self.codec is None:
                pos = 0
                while pos < size:
                    data = raw.read(pos, CHUNK)
                    if not data:
                        break
                    pos += len(data)
                    yield data
            else:
                yield from _Members(raw, self.codec, self.recover)
            self.sha256 = raw.sha256()


class _Members:
    """The member-by-member decode of one compressed file (see the module docstring)."""

    def __init__(self, raw: _RawFile, codec: Codec, recover: bool):
        self.raw, self.codec, self.recover = raw, codec, recover
        self.d = None  # decompressor of the member in progress
        self.start = 0  # raw offset where that member starts
        self.emitted = 0  # bytes of its output already passed on

    def __iter__(self) -> Iterator[bytes | Gap]:
        size, c = self.raw.size, self.codec
        if size == 0:
            yield Gap(0, 0, f"empty file: a {c.name.split()[0]} archive holds at least one {c.name}", truncated=True)
            return
        pos = 0
        while pos < size:
            data = self.raw.read(pos, CHUNK)
            if not data:
                break
            try:
                yield from self._feed(data, pos)
            except c.errors as e:
                why = f"corrupt compressed data in the {c.name} starting at byte {self.start} ({e})"
                if not self.recover:
                    yield Gap(pos, size, why)
                    return
                gap_start = yield from self._salvage(pos)
                nxt = self._resync(max(self.start + 1, gap_start - LOOKBACK))
                self.d = None
                yield Gap(gap_start, size if nxt is None else max(nxt, gap_start), why, resumed=nxt is not None)
                if nxt is None:
                    return
                pos = nxt
                continue
            pos += len(data)
        if self.d is not None:
            yield Gap(size, size, f"truncated archive: the file ends inside the {c.name} starting at byte "
                                  f"{self.start}", truncated=True)

    def _feed(self, data: bytes, pos: int) -> Iterator[bytes]:
        """Decode one raw chunk, starting new members as old ones end; output goes out as soon as it exists,
        so a member that fails later in the chunk costs none of the output before it."""
        off = 0
        while off < len(data):
            if self.d is None:
                if self.codec.padding:
                    while off < len(data) and data[off:off + 1] == self.codec.padding:
                        off += 1
                    if off == len(data):
                        return
                self.d, self.start, self.emitted = self.codec.new(), pos + off, 0
            out = self.d.decompress(data[off:])
            if out:
                self.emitted += len(out)
                yield out
            if not self.d.eof:
                return
            off = len(data) - len(self.d.unused_data)
            self.d = None

    def _salvage(self, fail_chunk: int):
        """Decode the failed member again from its start (in small slices from the failing chunk on) and
        pass on what the first pass lost with its failed call; returns where the decodable data ends."""
        d, total, p, good_end = self.codec.new(), 0, self.start, self.start
        while p < self.raw.size:
            data = self.raw.read(p, min(CHUNK, fail_chunk - p) if p < fail_chunk else SLICE)
            if not data:
                break
            try:
                out = d.decompress(data)
            except self.codec.errors:
                break
            if out:
                new = out[max(0, self.emitted - total):]
                total += len(out)
                if new:
                    self.emitted += len(new)
                    yield new
                good_end = p + len(data)
            if d.eof:  # the member decodes whole when sliced: the damage is right after it
                return p + len(data) - len(d.unused_data)
            p += len(data)
        return max(good_end, min(fail_chunk, p))

    def _resync(self, frm: int) -> int | None:
        """The first offset >= frm where a member starts that decodes (``_probe``), or None."""
        m, p = self.codec.magic, frm
        while p < self.raw.size:
            data = self.raw.read(p, CHUNK + len(m) - 1)
            i = data.find(m)
            while i >= 0:
                if self._probe(p + i):
                    return p + i
                i = data.find(m, i + 1)
            if len(data) < len(m):
                return None
            p += len(data) - (len(m) - 1)
        return None

    def _probe(self, at: int) -> bool:
        d, p = self.codec.new(), at
        while p < min(at + PROBE, self.raw.size):
            data = self.raw.read(p, SLICE)
            try:
                d.decompress(data)
            except self.codec.errors:
                return False
            if d.eof:
                return True
            p += len(data)
        return True
