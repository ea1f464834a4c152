"""Readers on small files written here in the published formats."""

import gzip
import hashlib
import json
import lzma

import pytest
import zstandard

from data_prep.readers import (CorruptInputError, ReadStats, SourceSpec, expand_inputs, read_blank_separated,
                               read_json_records, read_lines, read_source, read_text_file)
from molm_ds.errors import ConfigError, DataError

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
    body = b"".join(json.dumps({"text": f"document {i} " * 20}).encode() + b"\n" for i in range(5000))
    comp = {".jsonl.zst": zstandard.ZstdCompressor().compress, ".txt.xz": lzma.compress,
            ".jsonl.gz": gzip.compress}[suffix](body)
    p = tmp_path / ("t" + suffix)
    p.write_bytes(comp[: len(comp) * 2 // 3])
    with pytest.raises(CorruptInputError, match=r"t\..*:\d+: (truncated archive|corrupt compressed)"):
        list(read_lines(str(p)))
    stats = ReadStats()
    got = list(read_lines(str(p), stats=stats, skip_corrupt=True))
    assert stats.truncated and 0 < len(got) < 5000
    assert got == body.decode().split("\n")[: len(got)]
    assert stats.skipped_corrupt == 1 and stats.skipped_bytes > 0  # the cut last line, dropped and counted
    assert stats.sha256 == hashlib.sha256(p.read_bytes()).hexdigest()


def test_cc100_document_cut_by_corrupt_data_is_dropped_whole(tmp_path):
    first = "".join(f"line {i} of doc A\n" for i in range(5)) + "\n" + "doc B line 1\ndoc B line 2"
    second = " still B\ndoc B line 3\n\ndoc C\n\n"
    p = tmp_path / "x.txt.xz"
    p.write_bytes(lzma.compress(first.encode()) + b"\x01" * 64 + lzma.compress(second.encode()))
    stats = ReadStats()
    got = list(read_blank_separated(str(p), stats=stats, skip_corrupt=True))
    assert got == ["\n".join(f"line {i} of doc A" for i in range(5)), "doc C"]
    assert stats.skipped_corrupt == 1 and stats.undecodable_bytes == 64 and stats.docs == 2


def test_bom_at_file_start_and_on_json_lines(tmp_path):
    p = tmp_path / "b.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + b'{"text": "one"}\n' + b"\xef\xbb\xbf" + b'{"text": "two \xef\xbb\xbf kept"}\n')
    assert list(read_json_records(str(p))) == ["one", "two \ufeff kept"]  # inside text a BOM is content
    t = tmp_path / "b.txt"
    t.write_bytes(b"\xef\xbb\xbfline\n\xef\xbb\xbfsecond")
    assert list(read_lines(str(t))) == ["line", "\ufeffsecond"]  # only the file's first BOM is dropped


def test_lone_surrogates_replaced_and_counted(tmp_path):
    p = tmp_path / "s.jsonl"
    p.write_text('{"text": "a\\ud800b\\udfffc"}\n{"text": "pair \\ud83d\\ude00 ok"}\n{"text": "\\\\ud800 literal"}\n')
    stats = ReadStats()
    got = list(read_json_records(str(p), stats=stats))
    assert got == ["a\ufffdb\ufffdc", "pair \U0001f600 ok", "\\ud800 literal"]
    assert (stats.surrogates, stats.surrogate_docs) == (2, 1)
    for t in got:
        t.encode("utf-8")  # raises on a surrogate left in


def test_control_characters_read_exactly(tmp_path):
    text = "".join(chr(c) for c in range(32)) + "\x7f\x85\u2028\u2029\ufeff end"
    p = tmp_path / "c.jsonl.zst"
    p.write_bytes(zstandard.ZstdCompressor().compress(json.dumps({"text": text}).encode() + b"\n"))
    assert list(read_json_records(str(p))) == [text]
    raw = "a\x00b\x0bc\x0cd\re\x1cf\x85g\u2028h"  # line breaks other than \n do not split
    q = tmp_path / "c.txt"
    q.write_bytes(raw.encode())
    assert list(read_lines(str(q))) == [raw]


def test_missing_text_field_names_the_keys(tmp_path):
    p = tmp_path / "k.jsonl"
    p.write_text('{"content": "x", "id": 1}\n')
    with pytest.raises(CorruptInputError, match=r"k\.jsonl:1: record has no string field 'text'; its keys: "
                                                r"'content', 'id' \(choose the text field with --text-key\)"):
        list(read_json_records(str(p)))


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
    with pytest.raises(ConfigError, match="KIND:PATH"):
        SourceSpec.parse("/no/kind.jsonl")
    with pytest.raises(DataError, match="no file matches"):
        expand_inputs([f"pile:{tmp_path}/*.jsonl.zst"])
    with pytest.raises(DataError, match="no such file"):
        expand_inputs([f"pile:{tmp_path}/00.jsonl.zst"])
    with pytest.raises(DataError, match="is a directory"):
        expand_inputs([f"lines:{tmp_path}"])
    for i in (1, 0):
        (tmp_path / f"{i:02d}.jsonl.zst").write_bytes(b"")
    assert [s.path[-12:] for s in expand_inputs([f"pile:{tmp_path}/*.jsonl.zst"])] == ["00.jsonl.zst", "01.jsonl.zst"]


def test_surrogate_fast_path_equals_the_regex_on_every_text(tmp_path):
    """The reader skips the regex for ASCII text and lines without a surrogate escape; on random text mixing
    ASCII, Latin-1, Hangul (U+D000..), astral characters and lone surrogates it gives what the regex gives."""
    import random

    from data_prep.readers import replace_lone_surrogates

    rng = random.Random(0)
    alphabet = ["a", " ", "\\", "u", "d", "é", "\ud55c", "\U0001f600", "\ud800", "\udfff", "\udbff"]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12))) for _ in range(500)]
    p = tmp_path / "r.jsonl"
    p.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))  # ensure_ascii: surrogates as escapes
    got = list(read_json_records(str(p)))
    # json.loads joins an escaped high + low surrogate into one character, so compare with what it parses
    assert got == [replace_lone_surrogates(json.loads(json.dumps(t)), ReadStats()) for t in texts]
    assert any("\ufffd" in g for g in got)
    for g in got:
        g.encode("utf-8")  # raises on a surrogate left in
