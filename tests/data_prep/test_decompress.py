"""Member-by-member decoding with recovery, against a slow reference that decodes each member alone."""

import gzip
import hashlib
import json
import lzma
import random

import pytest
import zstandard

import data_prep.decompress as dz
from data_prep.decompress import Decoder, Gap
from data_prep.readers import CorruptInputError, ReadStats, read_json_records

COMPRESS = {".zst": lambda b: zstandard.ZstdCompressor().compress(b), ".xz": lzma.compress, ".gz": gzip.compress}
DECOMPRESS = {".zst": lambda b: zstandard.ZstdDecompressor().decompress(b), ".xz": lzma.decompress,
              ".gz": gzip.decompress}
SUFFIXES = sorted(COMPRESS)


def records(start, n, width=60):
    rng = random.Random(start)
    return [f"doc {i} " + "".join(rng.choice("abcdefgh ") for _ in range(width)) for i in range(start, start + n)]


def jsonl(docs):
    return b"".join(json.dumps({"text": t}).encode() + b"\n" for t in docs)


def garbage(n, seed=0):
    """Random bytes that hold no member magic of any codec."""
    rng = random.Random(seed)
    data = bytes(rng.randrange(256) for _ in range(n))
    for c in dz.CODECS.values():
        data = data.replace(c.magic, b"\0" * len(c.magic))
    return data


def decode_all(path, recover=True):
    pieces = list(Decoder(str(path), recover=recover))
    return b"".join(p for p in pieces if isinstance(p, bytes)), [p for p in pieces if isinstance(p, Gap)]


def read(path, **kw):
    stats = ReadStats()
    return list(read_json_records(str(path), stats=stats, skip_corrupt=True, **kw)), stats


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_clean_members_any_chunk_size_equal_reference(tmp_path, suffix, monkeypatch):
    members = [COMPRESS[suffix](jsonl(records(100 * k, 40))) for k in range(5)]
    p = tmp_path / ("m.jsonl" + suffix)
    p.write_bytes(b"".join(members))
    reference = b"".join(DECOMPRESS[suffix](m) for m in members)  # slow path: each member on its own
    for chunk in (7, 1000, 1 << 20):
        monkeypatch.setattr(dz, "CHUNK", chunk)
        out, gaps = decode_all(p)
        assert out == reference and gaps == []


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_a_valid_member_then_garbage_keeps_every_document(tmp_path, suffix):
    docs = records(0, 6)
    p = tmp_path / ("g.jsonl" + suffix)
    p.write_bytes(COMPRESS[suffix](jsonl(docs)) + garbage(5000))
    got, stats = read(p)
    assert got == docs
    assert stats.undecodable_bytes == 5000 and stats.corrupt_regions == 1 and not stats.truncated
    assert stats.sha256 == hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_a_corrupt_member_costs_only_that_member(tmp_path, suffix, monkeypatch):
    monkeypatch.setattr(dz, "CHUNK", 4096)  # several chunks, so the damage is not in the first one
    groups = [records(1000 * k, 30) for k in range(6)]
    members = [COMPRESS[suffix](jsonl(g)) for g in groups]
    bad = garbage(len(members[3]), seed=3)
    members[3] = bad
    p = tmp_path / ("c.jsonl" + suffix)
    p.write_bytes(b"".join(members))
    got, stats = read(p)
    assert got == [d for k, g in enumerate(groups) if k != 3 for d in g]
    assert stats.undecodable_bytes == len(bad) and stats.corrupt_regions == 1
    assert stats.sha256 == hashlib.sha256(p.read_bytes()).hexdigest()  # each byte hashed once despite re-reads


def test_damage_inside_one_big_frame_keeps_the_blocks_before_it(tmp_path):
    """One zstd frame of many blocks in one read chunk: everything decoded before the damaged block stays."""
    docs = records(0, 6000, width=100)
    comp = bytearray(zstandard.ZstdCompressor(level=1).compress(jsonl(docs)))
    assert len(comp) < dz.CHUNK
    at = int(len(comp) * 0.7)
    comp[at: at + 2048] = garbage(2048, seed=7)
    p = tmp_path / "big.jsonl.zst"
    p.write_bytes(bytes(comp))
    got, stats = read(p)
    assert len(got) > 0.5 * len(docs) and got == docs[: len(got)]
    assert stats.skipped_corrupt == 1  # the line the damage cut
    assert stats.undecodable_bytes > 0 and stats.corrupt_regions == 1


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_truncated_member(tmp_path, suffix):
    docs = records(0, 4000)  # several zstd blocks: a truncated block holds nothing decodable
    comp = COMPRESS[suffix](jsonl(docs))
    p = tmp_path / ("t.jsonl" + suffix)
    p.write_bytes(comp[: len(comp) * 2 // 3])
    with pytest.raises(CorruptInputError, match=r"t\.jsonl\..*:\d+: (truncated archive|corrupt compressed)"):
        list(read_json_records(str(p)))
    got, stats = read(p)
    assert 0 < len(got) < len(docs) and got == docs[: len(got)]
    assert stats.truncated or stats.corrupt_regions == 1


def test_a_member_after_a_truncated_one_is_found(tmp_path):
    a, b = records(0, 50), records(500, 50)
    first = zstandard.ZstdCompressor().compress(jsonl(a))
    p = tmp_path / "tb.jsonl.zst"
    p.write_bytes(first[:-20] + zstandard.ZstdCompressor().compress(jsonl(b)))
    got, stats = read(p)
    assert got[-50:] == b and got[:-50] == a[: len(got) - 50]


def test_xz_stream_padding_between_streams(tmp_path):
    a, b = records(0, 20), records(100, 20)
    p = tmp_path / "pad.txt.xz"
    p.write_bytes(lzma.compress(jsonl(a)) + b"\0" * 8 + lzma.compress(jsonl(b)))
    assert read(p)[0] == a + b


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_empty_archive(tmp_path, suffix):
    p = tmp_path / ("e.jsonl" + suffix)
    p.write_bytes(b"")
    with pytest.raises(CorruptInputError, match="empty file"):
        list(read_json_records(str(p)))
    got, stats = read(p)
    assert got == [] and stats.truncated


def test_strict_mode_does_not_scan(tmp_path, monkeypatch):
    p = tmp_path / "s.jsonl.zst"
    p.write_bytes(zstandard.ZstdCompressor().compress(jsonl(records(0, 3))) + garbage(100))
    monkeypatch.setattr(dz._Members, "_resync", lambda *a: pytest.fail("strict mode must not search for members"))
    out, gaps = decode_all(p, recover=False)
    assert out == jsonl(records(0, 3)) and len(gaps) == 1
