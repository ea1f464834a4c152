"""Packing documents into fixed windows.

Every document in a shard already ends with EOS (data_prep appends it), so a data source is one
long token stream: the shards' ``.bin`` files back to back. Window w of a source is the
``seq_len + 1`` tokens starting at ``w * seq_len``: inputs are its first ``seq_len`` tokens and
labels its last ``seq_len`` (so consecutive windows share one token and every token after the
first is a label exactly once). A source of N tokens has ``(N - 1) // seq_len`` windows; the tail
that does not fill a window is not used.
"""

from __future__ import annotations

import numpy as np

from molm_ds.data.indexed import IndexedShard
from molm_ds.data.manifest import check_shard_files, source_shards
from molm_ds.errors import DataError


class TokenStream:
    """The concatenated tokens of one source's shards, read by memmap without copying the corpus. The
    source must be complete and its files the sizes its manifest promises (``manifest.source_shards``)."""

    def __init__(self, path: str):
        self.path = path
        entries = source_shards(path)
        check_shard_files(entries)
        self.shards = [IndexedShard(e.prefix) for e in entries]
        for s in self.shards:
            if not s.is_contiguous():
                raise DataError(f"{s.prefix}: sequences are not stored back to back; rewrite the shard "
                                 "with data_prep.build_shards")
        sizes = np.array([s.num_tokens for s in self.shards], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])  # token offset of each shard
        self.num_tokens = int(self.offsets[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the stream as int64 (may span shards)."""
        if start < 0 or start + length > self.num_tokens:
            raise IndexError(f"read [{start}, {start + length}) outside the {self.num_tokens} tokens of {self.path}")
        out = np.empty(length, dtype=np.int64)
        i = int(np.searchsorted(self.offsets, start, side="right")) - 1
        done = 0
        while done < length:
            lo = start + done - int(self.offsets[i])
            take = min(length - done, self.shards[i].num_tokens - lo)
            out[done: done + take] = self.shards[i].tokens[lo: lo + take]
            done += take
            i += 1
        return out

    def document_starts(self) -> np.ndarray:
        """The first token of every document of the stream (int64, ascending; shards' document indices)."""
        out = []
        for off, s in zip(self.offsets[:-1], self.shards):
            seq_starts = np.concatenate([[0], np.cumsum(s.sequence_lengths, dtype=np.int64)])
            docs = np.asarray(s.document_indices[:-1], dtype=np.int64)
            out.append(seq_starts[docs] + int(off))
        starts = np.concatenate(out) if out else np.zeros(0, dtype=np.int64)
        starts = starts[starts < self.num_tokens]  # an empty shard's document index adds no document
        return np.unique(starts)

    def num_windows(self, seq_len: int) -> int:
        return max(self.num_tokens - 1, 0) // seq_len

    def window(self, w: int, seq_len: int) -> np.ndarray:
        """Window w: ``seq_len + 1`` tokens starting at ``w * seq_len``."""
        return self.read(w * seq_len, seq_len + 1)


def pack_reference(documents: list[list[int]], eos_id: int, seq_len: int) -> list[list[int]]:
    """Slow path: append EOS to every document, concatenate, cut the windows with a Python loop."""
    stream: list[int] = []
    for d in documents:
        stream.extend(d)
        stream.append(eos_id)
    windows = []
    start = 0
    while start + seq_len + 1 <= len(stream):
        windows.append(stream[start: start + seq_len + 1])
        start += seq_len
    return windows
