"""Megatron-compatible indexed shards (``prefix.bin`` + ``prefix.idx``, format "MMIDIDX" version 1).

The ``.idx`` layout (all little-endian), as written by Megatron-LM's ``_IndexWriter``:

    9 bytes   magic  b"MMIDIDX\\x00\\x00"
    uint64    version = 1
    uint8     dtype code of the tokens in .bin (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64,
              6 float64, 7 float32, 8 uint16)
    uint64    S = number of sequences
    uint64    D = number of entries in the document index (documents + 1)
    int32[S]  sequence lengths (tokens)
    int64[S]  sequence pointers (byte offset of each sequence in .bin)
    int64[D]  document index: 0, then the end (exclusive sequence index) of every document

We write one sequence per document (no sentence splitting), so the document index is 0..S.
The ``.bin`` file is the tokens of all sequences back to back. This module reads shards by memmap;
the writer lives in ``data_prep.indexed_writer``.
"""

from __future__ import annotations

import os
import struct

import numpy as np

from molm_ds.errors import DataError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_BYTES = len(MAGIC) + 8 + 1 + 8 + 8  # 34

DTYPE_CODES: dict[int, type] = {
    1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16,
}
CODE_OF_DTYPE = {np.dtype(v): k for k, v in DTYPE_CODES.items()}


def best_dtype(vocab_size: int) -> np.dtype:
    """uint16 when the vocabulary fits (Megatron's rule: < 65500), else int32."""
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


def dtype_code(dtype) -> int:
    return CODE_OF_DTYPE[np.dtype(dtype)]


class IndexedShard:
    """One ``prefix.bin``/``prefix.idx`` pair, memory-mapped read-only.

    ``shard[i]`` is the token array of document i (a view into the memmap); ``tokens`` is the whole
    .bin as one flat array (documents back to back, each ending with EOS when written by data_prep).
    """

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = str(prefix)
        idx_path, bin_path = self.prefix + ".idx", self.prefix + ".bin"
        for p in (idx_path, bin_path):
            if not os.path.exists(p):
                raise DataError(f"{p} not found: an indexed shard is a prefix with both .bin and .idx files")
        with open(idx_path, "rb") as f:
            head = f.read(HEADER_BYTES)
        if len(head) < HEADER_BYTES or head[: len(MAGIC)] != MAGIC:
            raise DataError(f"{idx_path}: not an MMIDIDX index (bad magic {head[:9]!r})")
        version, code, n_seq, n_doc = struct.unpack("<QBQQ", head[len(MAGIC):])
        if version != VERSION:
            raise DataError(f"{idx_path}: index version {version}, only version {VERSION} is supported")
        if code not in DTYPE_CODES:
            raise DataError(f"{idx_path}: unknown dtype code {code}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        expect = HEADER_BYTES + 4 * n_seq + 8 * n_seq + 8 * n_doc
        size = os.path.getsize(idx_path)
        if size != expect:
            raise DataError(f"{idx_path}: {'truncated index' if size < expect else 'index longer than its header says'} "
                            f"({size} bytes, header promises {expect}); the shard is damaged: rebuild it")
        idx = np.memmap(idx_path, dtype=np.uint8, mode="r")
        off = HEADER_BYTES
        self.sequence_lengths = np.frombuffer(idx, dtype="<i4", count=n_seq, offset=off)
        off += 4 * n_seq
        self.sequence_pointers = np.frombuffer(idx, dtype="<i8", count=n_seq, offset=off)
        off += 8 * n_seq
        self.document_indices = np.frombuffer(idx, dtype="<i8", count=n_doc, offset=off)
        self._check_structure(idx_path, n_seq, n_doc)
        n_tokens = int(self.sequence_lengths.sum(dtype=np.int64))
        bin_size = os.path.getsize(bin_path)
        if bin_size != n_tokens * self.dtype.itemsize:
            raise DataError(
                f"{bin_path}: {bin_size} bytes but the index lists {n_tokens} tokens of {self.dtype} "
                f"({n_tokens * self.dtype.itemsize} bytes); the shard is incomplete or does not match its .idx")
        self.num_tokens = n_tokens
        self.tokens = (np.memmap(bin_path, dtype=self.dtype, mode="r") if n_tokens
                       else np.zeros(0, dtype=self.dtype))

    def _check_structure(self, idx_path: str, n_seq: int, n_doc: int) -> None:
        """DataError unless the index can be read as it claims: lengths >= 0, every sequence inside the .bin
        (pointers aligned to the dtype), a document index that runs from 0 to S without going back. A
        damaged index is refused here, before any of it is read as tokens."""
        bad = None
        lengths = self.sequence_lengths.astype(np.int64)
        pointers = self.sequence_pointers
        bin_size = os.path.getsize(self.prefix + ".bin")
        if n_seq and int(lengths.min()) < 0:
            bad = "a negative sequence length"
        elif n_seq and (int(pointers.min()) < 0 or int((pointers + lengths * self.dtype.itemsize).max()) > bin_size):
            bad = "a sequence that lies outside the .bin file"
        elif n_seq and bool((pointers % self.dtype.itemsize).any()):
            bad = "a sequence pointer that is not a multiple of the token size"
        elif n_doc < 1 or int(self.document_indices[0]) != 0 or int(self.document_indices[-1]) != n_seq:
            bad = f"a document index that does not run from 0 to {n_seq}"
        elif bool((np.diff(self.document_indices) < 0).any()):
            bad = "a document index that goes backwards"
        if bad is not None:
            raise DataError(f"{idx_path}: the index has {bad}; the shard is damaged: rebuild it")

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    @property
    def num_documents(self) -> int:
        return max(len(self.document_indices) - 1, 0)

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(self.sequence_pointers[i]) // self.dtype.itemsize
        return self.tokens[start: start + int(self.sequence_lengths[i])]

    def is_contiguous(self) -> bool:
        """True when sequences are stored back to back in order (always so for data_prep output)."""
        if len(self) == 0:
            return True
        expect = np.zeros(len(self), dtype=np.int64)
        np.cumsum(self.sequence_lengths[:-1], out=expect[1:])
        return bool(np.array_equal(expect * self.dtype.itemsize, self.sequence_pointers))
