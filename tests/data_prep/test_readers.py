"""Readers on small files written here in the published formats."""

import gzip
import json
import lzma

import pytest
import zstandard

from data_prep.readers import (CorruptInputError, ReadStats, SourceSpec, expand_inputs, read_blank_separated,
                               read_json_records, read_lines, read_source, read_text_file)

PILE_DOCS = [("Plain English text.", "Pile-CC"), ("ünïcödé 你好 🙂", "Pile-CC"), ("", "Pile-CC"),
             ("def f():\r\n    return 1\r\n", "Github"), ("x" * 20000, "Pile-CC")]


def write_pile(path, records, raw_lines=()):
    lines = [json.dumps({"text": t, "meta": {"pile_set_name": s}}).encode() for t, s in records]
    lines += list(raw_lines)
    path.write_bytes(zstandard.ZstdCompressor().compress(b"\n".join(lines) + b"\n"))


def test_pile_reads_all_records_exactly(tmp_path):
    p = tmp_path / "00.jsonl.zst"
    write_pile(p, PILE_DOCS)
    stats = ReadStats()
    assert list(read_json_records(str(p), stats=stats)) == [t for t, _ in PILE_DOCS]
    assert stats.docs == len(PILE_DOCS) and stats.sha256 is not None


def test_pile_subset_filter_counts(tmp_path):
    p = tmp_path / "00.jsonl.zst"
    write_pile(p, PILE_DOCS)
    stats = ReadStats()
    got = list(read_source(SourceSpec("pile", str(p)), subsets={"Github"}, stats=stats))
    assert got == ["def f():\r\n    return 1\r\n"]
    assert stats.filtered == 4


def test_pile_several_zstd_frames(tmp_path):
    p = tmp_path / "00.jsonl.zst"
    c = zstandard.ZstdCompressor()
    a = c.compress(json.dumps({"text": "a"}).encode() + b"\n")
    b = c.compress(json.dumps({"text": "b"}).encode() + b"\n")
    p.write_bytes(a + b)
    assert list(read_json_records(str(p))) == ["a", "b"]


def test_bad_json_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl.zst"
    write_pile(p, PILE_DOCS[:2], raw_lines=[b'{"text": "ok"}', b'{"text": broken'])
    with pytest.raises(CorruptInputError, match=r"bad\.jsonl\.zst:4: bad JSON"):
        list(read_json_records(str(p)))


def test_bad_json_skip_and_count(tmp_path):
    p = tmp_path / "bad.jsonl.zst"
    write_pile(p, PILE_DOCS[:2], raw_lines=[b'{"text": broken', b'{"no_text": 1}', b'{"text": "\xff\xfe"}', b'{"text": "end"}'])
    stats = ReadStats()
    got = list(read_json_records(str(p), stats=stats, skip_corrupt=True))
    assert got == [PILE_DOCS[0][0], PILE_DOCS[1][0], "end"]
    assert stats.skipped_corrupt == 3 and len(stats.first_errors) == 3


def test_undecodable_bytes_error(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_bytes(b'{"text": "a"}\n{"text": "\xc3\x28"}\n')
    with pytest.raises(CorruptInputError, match=r"x\.jsonl:2: undecodable UTF-8"):
        list(read_json_records(str(p)))


@pytest.mark.parametrize("suffix", [".jsonl.zst", ".txt.xz", ".jsonl.gz"])
def test_truncated_archive(tmp_path, suffix):
    body = b"".join(json.dumps({"text": f"document {i} " * 20}).encode() + b"\n" for i in range(500))
    comp = {".jsonl.zst": zstandard.ZstdCompressor().compress, ".txt.xz": lzma.compress,
            ".jsonl.gz": gzip.compress}[suffix](body)
    p = tmp_path / ("t" + suffix)
    p.write_bytes(comp[: len(comp) * 2 // 3])
    with pytest.raises(CorruptInputError, match=r"t\..*:\d+: (truncated archive|corrupt compressed)"):
        list(read_lines(str(p)))
    stats = ReadStats()
    got = list(read_lines(str(p), stats=stats, skip_corrupt=True))
    assert stats.truncated and stats.sha256 is None and len(got) < 500


def test_cc100_blank_line_documents_crlf_unicode(tmp_path):
    raw = "Erste Zeile\r\nzweite Zeile ü\r\n\r\nKiswahili: habari 你好\r\n\r\n\r\nlast doc no newline"
    p = tmp_path / "sw.txt.xz"
    p.write_bytes(lzma.compress(raw.encode()))
    got = list(read_blank_separated(str(p)))
    assert got == ["Erste Zeile\nzweite Zeile ü", "Kiswahili: habari 你好", "last doc no newline"]


def test_plain_text_and_lines(tmp_path):
    p = tmp_path / "a.txt"
    p.write_bytes(b"one\r\ntwo\n\nthree")
    assert list(read_text_file(str(p))) == ["one\ntwo\n\nthree"]
    assert list(read_lines(str(p))) == ["one", "two", "three"]


def test_hf_saved_dataset_and_files(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": ["a b", "ü c", ""]})
    ds.save_to_disk(str(tmp_path / "saved"))
    assert list(read_source(SourceSpec("hf", str(tmp_path / "saved")))) == ["a b", "ü c", ""]
    f = tmp_path / "rows.jsonl"
    f.write_text('{"content": "x"}\n{"content": "y"}\n')
    assert list(read_source(SourceSpec("hf", str(f)), text_key="content")) == ["x", "y"]


def test_source_spec_errors(tmp_path):
    with pytest.raises(ValueError, match="KIND:PATH"):
        SourceSpec.parse("/no/kind.jsonl")
    with pytest.raises(FileNotFoundError):
        expand_inputs([f"pile:{tmp_path}/*.jsonl.zst"])
    for i in (1, 0):
        (tmp_path / f"{i:02d}.jsonl.zst").write_bytes(b"")
    assert [s.path[-12:] for s in expand_inputs([f"pile:{tmp_path}/*.jsonl.zst"])] == ["00.jsonl.zst", "01.jsonl.zst"]
