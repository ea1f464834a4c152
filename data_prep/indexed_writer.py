"""Writes one Megatron MMIDIDX v1 shard (format in ``molm_ds.data.indexed``), atomically:
tokens go to ``prefix.bin.tmp``, the index to ``prefix.idx.tmp``; ``finish()`` renames .bin then .idx,
so a shard whose .idx exists is complete."""

from __future__ import annotations

import os
import struct

import numpy as np

from molm_ds.data.indexed import MAGIC, VERSION, dtype_code


def atomic_write_bytes(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class IndexedShardWriter:
    def __init__(self, prefix: str, dtype):
        self.prefix, self.dtype = prefix, np.dtype(dtype)
        self._bin = open(prefix + ".bin.tmp", "wb")
        self._lengths: list[np.ndarray] = []
        self.num_tokens = 0

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents given as one flat token array and their lengths (each already ends in EOS)."""
        if int(lengths.sum()) != len(tokens):
            raise ValueError("lengths do not add up to the number of tokens")
        self._bin.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        self._lengths.append(np.asarray(lengths, dtype=np.int32))
        self.num_tokens += len(tokens)

    @property
    def num_docs(self) -> int:
        return sum(len(x) for x in self._lengths)

    def finish(self) -> tuple[int, int]:
        """Close and publish the shard; returns (documents, tokens)."""
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, dtype=np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        doc_idx = np.arange(len(lengths) + 1, dtype=np.int64)
        head = MAGIC + struct.pack("<QBQQ", VERSION, dtype_code(self.dtype), len(lengths), len(doc_idx))
        data = head + lengths.astype("<i4").tobytes() + pointers.astype("<i8").tobytes() + doc_idx.astype("<i8").tobytes()
        os.replace(self.prefix + ".bin.tmp", self.prefix + ".bin")
        atomic_write_bytes(self.prefix + ".idx", data)
        return len(lengths), self.num_tokens

    def abort(self) -> None:
        self._bin.close()
        for p in (self.prefix + ".bin.tmp", self.prefix + ".idx.tmp"):
            if os.path.exists(p):
                os.remove(p)
