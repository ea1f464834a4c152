"""The .idx/.bin we write, read back by an independent reader written from the MMIDIDX v1 spec."""

import struct

import numpy as np
import pytest

from data_prep.indexed_writer import IndexedShardWriter
from molm_ds.data.indexed import IndexedShard

SPEC_DTYPES = {1: "u1", 2: "i1", 3: "<i2", 4: "<i4", 5: "<i8", 6: "<f8", 7: "<f4", 8: "<u2"}


def spec_read(prefix):
    """Independent reader: field by field with struct, no shared code."""
    with open(prefix + ".idx", "rb") as f:
        raw = f.read()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    (version,) = struct.unpack_from("<Q", raw, 9)
    (code,) = struct.unpack_from("<B", raw, 17)
    n_seq, n_doc = struct.unpack_from("<QQ", raw, 18)
    pos = 34
    lengths = list(struct.unpack_from(f"<{n_seq}i", raw, pos)); pos += 4 * n_seq
    pointers = list(struct.unpack_from(f"<{n_seq}q", raw, pos)); pos += 8 * n_seq
    doc_idx = list(struct.unpack_from(f"<{n_doc}q", raw, pos)); pos += 8 * n_doc
    assert pos == len(raw), "trailing bytes in .idx"
    data = open(prefix + ".bin", "rb").read()
    dt = np.dtype(SPEC_DTYPES[code])
    docs = [np.frombuffer(data, dtype=dt, count=n, offset=p).tolist() for n, p in zip(lengths, pointers)]
    return version, code, lengths, pointers, doc_idx, docs


@pytest.mark.parametrize("dtype,code", [(np.uint16, 8), (np.int32, 4)])
def test_writer_matches_spec(tmp_path, dtype, code):
    docs = [[5, 6, 2], [2], [7, 8, 9, 10, 2], [65000 if dtype == np.uint16 else 100000, 2]]
    w = IndexedShardWriter(str(tmp_path / "s"), dtype)
    w.add_documents(np.array(sum(docs[:2], [])), np.array([3, 1]))
    w.add_documents(np.array(sum(docs[2:], [])), np.array([5, 2]))
    assert w.finish() == (4, 11)
    version, c, lengths, pointers, doc_idx, got = spec_read(str(tmp_path / "s"))
    isz = np.dtype(dtype).itemsize
    assert (version, c) == (1, code)
    assert lengths == [3, 1, 5, 2]
    assert pointers == [0, 3 * isz, 4 * isz, 9 * isz]
    assert doc_idx == [0, 1, 2, 3, 4]
    assert got == docs
    shard = IndexedShard(str(tmp_path / "s"))
    assert [shard[i].tolist() for i in range(len(shard))] == docs and shard.num_documents == 4
    assert not list(tmp_path.glob("*.tmp"))


def test_empty_shard_and_abort(tmp_path):
    w = IndexedShardWriter(str(tmp_path / "e"), np.uint16)
    assert w.finish() == (0, 0)
    assert spec_read(str(tmp_path / "e"))[2:5] == ([], [], [0])
    w = IndexedShardWriter(str(tmp_path / "a"), np.uint16)
    w.add_documents(np.array([1, 2]), np.array([2]))
    w.abort()
    assert not list(tmp_path.glob("a.*"))


def test_reader_rejects_mismatched_bin(tmp_path):
    w = IndexedShardWriter(str(tmp_path / "s"), np.uint16)
    w.add_documents(np.array([1, 2, 3]), np.array([3]))
    w.finish()
    with open(tmp_path / "s.bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(ValueError, match="does not match its .idx"):
        IndexedShard(str(tmp_path / "s"))
    (tmp_path / "s.idx").write_bytes(b"NOTANIDX" + b"\0" * 40)
    with pytest.raises(ValueError, match="bad magic"):
        IndexedShard(str(tmp_path / "s"))
