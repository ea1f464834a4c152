"""Tokenisation to shards: token counts vs SentencePiece, corrupt input, resume, parallel == serial."""

import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys

import pytest
import sentencepiece as spm
import zstandard

import data_prep.build_shards as bs
from data_prep.build_shards import build_shards
from data_prep.readers import CorruptInputError, SourceSpec
from molm_ds import cli
from molm_ds.data import IndexedShard, shard_prefixes
from molm_ds.errors import ConfigError, DataError
from tests.data_prep.pile_corpus import docs_for, write_pile

def read_all(out_dir):
    return [IndexedShard(p)[i].tolist() for p in shard_prefixes(out_dir) for i in range(len(IndexedShard(p)))]


def test_tokens_equal_sentencepiece_plus_eos(tmp_path, corpus, tokenizer):
    man = build_shards(corpus, tokenizer, str(tmp_path / "out"), docs_per_shard=4, progress=False)
    sp = spm.SentencePieceProcessor(model_file=tokenizer)
    expect = [sp.encode(d) + [sp.eos_id()] for i in range(3) for d in docs_for(i) if d]
    assert read_all(tmp_path / "out") == expect
    assert man["tokens"] == sum(map(len, expect)) and man["documents"] == len(expect)
    assert [s["empty_docs"] for s in man["sources"]] == [1, 1, 1]
    assert len(man["shards"]) == 9  # 9 documents per input, 4 per shard
    assert man["dtype"] == "uint16" and man["tokenizer"]["eos_id"] == 2
    assert all(len(s["sha256"]) == 64 for s in man["sources"])
    assert max(len(d) for d in expect) > 1000  # the long document was encoded whole


def test_parallel_equals_serial(tmp_path, corpus, tokenizer):
    build_shards(corpus, tokenizer, str(tmp_path / "a"), workers=1, docs_per_shard=5, progress=False)
    build_shards(corpus, tokenizer, str(tmp_path / "b"), workers=2, docs_per_shard=5, progress=False)
    for name in sorted(os.listdir(tmp_path / "a")):
        if name.endswith((".bin", ".idx")):
            assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


@pytest.mark.parametrize("die_at,n_done", [(2, 1), (4, 3)])  # mid-input and at an input boundary
def test_resume_after_interruption(tmp_path, corpus, tokenizer, monkeypatch, die_at, n_done):
    ref = tmp_path / "ref"
    build_shards(corpus, tokenizer, str(ref), docs_per_shard=4, progress=False)
    out = tmp_path / "out"
    real_finish = bs.IndexedShardWriter.finish
    calls = {"n": 0}

    def dying_finish(self):
        calls["n"] += 1
        if calls["n"] == die_at:
            raise KeyboardInterrupt("killed")
        return real_finish(self)

    monkeypatch.setattr(bs.IndexedShardWriter, "finish", dying_finish)
    with pytest.raises(KeyboardInterrupt):
        build_shards(corpus, tokenizer, str(out), docs_per_shard=4, progress=False)
    monkeypatch.setattr(bs.IndexedShardWriter, "finish", real_finish)
    assert not (out / "manifest.json").exists() and (out / "progress.json").exists()
    assert not list(out.glob("*.tmp"))
    done = {p.name: p.stat().st_mtime_ns for p in out.glob("*.idx")}
    assert len(done) == n_done

    encoded = []
    real_encode = bs.encode_batch
    monkeypatch.setattr(bs, "encode_batch", lambda task: encoded.append(task[0]) or real_encode(task))
    build_shards(corpus, tokenizer, str(out), docs_per_shard=4, progress=False)
    assert not set(encoded) & {n[:-4] for n in done}  # finished shards were not tokenised again
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.idx") if p.name in done} == done
    assert read_all(out) == read_all(ref)
    assert json.loads((out / "manifest.json").read_text())["shards"] == json.loads((ref / "manifest.json").read_text())["shards"]
    encoded.clear()
    build_shards(corpus, tokenizer, str(out), docs_per_shard=4, progress=False)  # finished: nothing to do
    assert encoded == []


@pytest.mark.timeout(120)
@pytest.mark.parametrize("interrupted", [False, True])
def test_pool_workers_end_under_a_parent_whose_sigterm_handler_only_records(tmp_path, corpus, tokenizer, monkeypatch,
                                                                            interrupted):
    """A process that only records SIGTERM (a trainer's preemption handler does) and then tokenises with a
    pool: the finished build and an interrupted one both return, and no worker is left."""
    recorded = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: recorded.append(signum))
    try:
        if interrupted:
            monkeypatch.setattr(bs.IndexedShardWriter, "finish", lambda self: (_ for _ in ()).throw(KeyboardInterrupt()))
            with pytest.raises(KeyboardInterrupt):
                build_shards(corpus, tokenizer, str(tmp_path / "o"), workers=2, docs_per_shard=4, progress=False)
        else:
            build_shards(corpus, tokenizer, str(tmp_path / "o"), workers=2, docs_per_shard=4, progress=False)
            assert (tmp_path / "o" / "manifest.json").exists()
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert multiprocessing.active_children() == [] and recorded == []


def test_changed_settings_refused(tmp_path, corpus, tokenizer):
    build_shards(corpus, tokenizer, str(tmp_path / "o"), docs_per_shard=4, progress=False)
    with pytest.raises(DataError, match=r"finished build with other settings or inputs: docs_per_shard: 4 -> 5\. "
                                        r"Use a new --out, or pass --overwrite"):
        build_shards(corpus, tokenizer, str(tmp_path / "o"), docs_per_shard=5, progress=False)
    man = build_shards(corpus, tokenizer, str(tmp_path / "o"), docs_per_shard=5, overwrite=True, progress=False)
    assert len(man["shards"]) == 6


def test_changed_input_of_the_same_size_is_refused(tmp_path, corpus, tokenizer):
    out = str(tmp_path / "o")
    build_shards(corpus, tokenizer, out, docs_per_shard=4, progress=False)
    p = corpus[1].path
    st = os.stat(p)
    data = bytearray(open(p, "rb").read())
    data[len(data) // 2] ^= 0xFF  # same size
    open(p, "wb").write(bytes(data))
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))  # even with its old time: a sampled block differs
    with pytest.raises(DataError, match=r"01\.jsonl\.zst changed \(sampled content differs\)"):
        build_shards(corpus, tokenizer, out, docs_per_shard=4, progress=False)


def test_touched_input_is_refused_with_the_command_that_restores_its_time(tmp_path, corpus, tokenizer, monkeypatch):
    out = tmp_path / "o"
    real_finish = bs.IndexedShardWriter.finish
    calls = {"n": 0}

    def dying_finish(self):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return real_finish(self)

    monkeypatch.setattr(bs.IndexedShardWriter, "finish", dying_finish)
    with pytest.raises(KeyboardInterrupt):
        build_shards(corpus, tokenizer, str(out), docs_per_shard=4, progress=False)
    monkeypatch.setattr(bs.IndexedShardWriter, "finish", real_finish)
    p = corpus[0].path
    mtime = os.stat(p).st_mtime_ns
    os.utime(p, ns=(mtime + 10**9, mtime + 10**9))
    with pytest.raises(DataError, match=r"unfinished build \(2 shards done\).*00\.jsonl\.zst was modified.*"
                                        r"restore the time with: touch -d @\d+\.\d{9} "):
        build_shards(corpus, tokenizer, str(out), docs_per_shard=4, progress=False)
    cmd = re.search(r"touch -d (@\S+) ", str(_raised(build_shards, corpus, tokenizer, str(out), docs_per_shard=4,
                                                      progress=False))).group(1)
    subprocess.run(["touch", "-d", cmd, p], check=True)
    man = build_shards(corpus, tokenizer, str(out), docs_per_shard=4, progress=False)  # resumes
    assert man["documents"] == 24


def _raised(fn, *args, **kw):
    with pytest.raises(DataError) as e:
        fn(*args, **kw)
    return e.value


def test_corrupt_line_stops_or_is_counted(tmp_path, tokenizer):
    p = tmp_path / "c.jsonl.zst"
    write_pile(p, ["good one", "good two"], extra=b'{"text": "oops\n{"text": "after"}\n')
    with pytest.raises(CorruptInputError, match=r"c\.jsonl\.zst:3"):
        build_shards([SourceSpec("pile", str(p))], tokenizer, str(tmp_path / "x"), progress=False)
    man = build_shards([SourceSpec("pile", str(p))], tokenizer, str(tmp_path / "y"), skip_corrupt=True, progress=False)
    assert man["skipped_corrupt"] == 1 and man["documents"] == 3 and man["skipped_bytes"] == len('{"text": "oops')
    assert "c.jsonl.zst:3" in man["sources"][0]["errors"][0]


@pytest.mark.parametrize("bad_at", [5, 8])  # inside shard 1, and right after shard 1 is full
def test_stop_on_corrupt_then_skip_corrupt_continues_from_finished_shards(tmp_path, tokenizer, monkeypatch, bad_at):
    docs = [f"document number {i}" for i in range(12)]
    lines = [json.dumps({"text": t}).encode() for t in docs]
    lines.insert(bad_at, b'{"text": broken')
    p = tmp_path / "in.jsonl.zst"
    p.write_bytes(zstandard.ZstdCompressor().compress(b"\n".join(lines) + b"\n"))
    spec, out = [SourceSpec("pile", str(p))], tmp_path / "out"
    with pytest.raises(CorruptInputError, match=rf"in\.jsonl\.zst:{bad_at + 1}: bad JSON"):
        build_shards(spec, tokenizer, str(out), docs_per_shard=4, progress=False)
    done = {q.name: q.stat().st_mtime_ns for q in out.glob("*.idx")}
    assert len(done) == bad_at // 4  # every shard whose documents were all read is kept
    encoded = []
    real_encode = bs.encode_batch
    monkeypatch.setattr(bs, "encode_batch", lambda task: encoded.append(task[0]) or real_encode(task))
    man = build_shards(spec, tokenizer, str(out), docs_per_shard=4, skip_corrupt=True, progress=False)
    assert not set(encoded) & {n[:-4] for n in done}
    assert {q.name: q.stat().st_mtime_ns for q in out.glob("*.idx") if q.name in done} == done
    ref = build_shards(spec, tokenizer, str(tmp_path / "ref"), docs_per_shard=4, skip_corrupt=True, progress=False)
    assert read_all(out) == read_all(tmp_path / "ref") and man["skipped_corrupt"] == ref["skipped_corrupt"] == 1


def test_control_characters_and_surrogates_round_trip(tmp_path, tokenizer):
    """NUL, C0/C1 controls, DEL, lone CR, U+2028 and a mid-text BOM come back exactly; a lone surrogate
    (valid JSON, not encodable as UTF-8) becomes U+FFFD and is counted."""
    controls = "".join(chr(c) for c in range(32)) + "\x7f" + "".join(chr(c) for c in range(0x80, 0xA0))
    texts = [f"a{controls}z", "nul\x00in the middle\r\nand a lone \r cr", "sep\u2028\u2029 bom\ufeff here"]
    p = tmp_path / "cc.jsonl"
    body = "".join(json.dumps({"text": t}) + "\n" for t in texts) + '{"text": "half \\ud800 pair"}\n'
    p.write_bytes(b"\xef\xbb\xbf" + body.encode())  # a BOM before line 1 too
    man = build_shards([SourceSpec("jsonl", str(p))], tokenizer, str(tmp_path / "o"), progress=False)
    sp = spm.SentencePieceProcessor(model_file=tokenizer)
    got = [sp.decode(doc[:-1]) for doc in read_all(tmp_path / "o")]
    assert got == texts + ["half \ufffd pair"]
    assert (man["surrogates"], man["surrogate_docs"]) == (1, 1)
    assert man["sources"][0]["surrogates"] == 1


def test_runs_that_produce_nothing_are_errors(tmp_path, tokenizer):
    p = tmp_path / "00.jsonl.zst"
    write_pile(p, ["one", "two"])  # set name Pile-CC
    spec = [SourceSpec("pile", str(p))]
    with pytest.raises(ConfigError, match=r"--pile-subset 'pile-cc' is not a set name of these inputs; did you mean "
                                          r"'Pile-CC'\?"):
        build_shards(spec, tokenizer, str(tmp_path / "a"), subsets={"pile-cc"}, progress=False)
    assert not (tmp_path / "a").exists()  # refused before anything was written
    with pytest.raises(DataError, match=r"no documents in 1 input.*--pile-subset 'Books3' matched no record "
                                        r"\(names seen: 'Pile-CC'\)"):
        build_shards(spec, tokenizer, str(tmp_path / "b"), subsets={"Books3"}, progress=False)
    assert not (tmp_path / "b" / "manifest.json").exists()
    man = build_shards(spec, tokenizer, str(tmp_path / "b"), subsets={"Pile-CC"}, progress=False)  # no --overwrite needed
    assert man["documents"] == 2
    man = build_shards(spec, tokenizer, str(tmp_path / "c"), subsets={"Pile-CC", "ArXiv"}, progress=False)
    assert man["warnings"] == ["--pile-subset 'ArXiv' matched no record (names seen: 'Pile-CC')"]
    blank = tmp_path / "blank.txt"
    blank.write_text("\n \n")
    with pytest.raises(DataError, match="no documents in 1 input"):
        build_shards([SourceSpec("lines", str(blank))], tokenizer, str(tmp_path / "d"), progress=False)
    empty = tmp_path / "e.jsonl"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="every input is an empty file"):
        build_shards([SourceSpec("jsonl", str(empty))], tokenizer, str(tmp_path / "e"), progress=False)
    zst = tmp_path / "z.jsonl.zst"
    zst.write_bytes(b"")
    with pytest.raises(DataError, match="is an empty file, not a compressed archive"):
        build_shards([SourceSpec("pile", str(zst)), *spec], tokenizer, str(tmp_path / "f"), progress=False)
    man = build_shards([SourceSpec("pile", str(zst)), *spec], tokenizer, str(tmp_path / "f"), skip_corrupt=True,
                       progress=False)
    assert man["truncated_inputs"] == [str(zst)] and man["documents"] == 2
    with pytest.raises(ConfigError, match="--docs-per-shard must be a whole number >= 1, got 0"):
        build_shards(spec, tokenizer, str(tmp_path / "g"), docs_per_shard=0, progress=False)


def test_stray_shards_without_progress_are_not_overwritten(tmp_path, corpus, tokenizer):
    out = tmp_path / "o"
    out.mkdir()
    (out / "part-00000-00000.bin").write_bytes(b"keep me")
    with pytest.raises(DataError, match="holds 1 shard files but no manifest.json or progress.json"):
        build_shards(corpus, tokenizer, str(out), progress=False)
    assert (out / "part-00000-00000.bin").read_bytes() == b"keep me"


def run_cli(capsys, module, *argv):
    """A data_prep command in this process: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as e:
        cli.run(module.main, list(argv))
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_cli_user_errors_are_one_line(tmp_path, capsys, corpus, tokenizer):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": broken\n')
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"not a model")
    common = ["--out", str(tmp_path / "o"), "--no-progress"]
    cases = [
        (["--input", f"jsonl:{bad}", "--tokenizer", tokenizer], r"bad\.jsonl:2: bad JSON .*--skip-corrupt"),
        (["--input", f"jsonl:{bad}", "--tokenizer", str(garbage)], "is not a SentencePiece model"),
        (["--input", f"jsonl:{bad}", "--tokenizer", str(tmp_path / "nope.model")], "no such file"),
        (["--input", f"{bad}", "--tokenizer", tokenizer], "expected KIND:PATH"),
        (["--input", f"jsonl:{bad}", "--tokenizer", tokenizer, "--docs-per-shard", "0"], "--docs-per-shard: .*not >= 1"),
        (["--input", f"jsonl:{bad}", "--tokenizer", tokenizer, "--workers", "x"], "--workers: .*not a whole number"),
        (["--input", f"pile:{corpus[0].path}", "--tokenizer", tokenizer, "--pile-subset", "pile-cc"], "did you mean 'Pile-CC'"),
    ]
    for argv, needle in cases:
        code, out, err = run_cli(capsys, bs, *argv, *common)
        assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and re.search(needle, err), (argv, err)


def test_cli_says_what_skip_corrupt_dropped(tmp_path, capsys, tokenizer):
    docs = [f"doc {i} " * 30 for i in range(50)]
    p = tmp_path / "c.jsonl.zst"
    p.write_bytes(zstandard.ZstdCompressor().compress(b"".join(json.dumps({"text": t}).encode() + b"\n"
                                                               for t in docs)) + b"garbage" * 100)
    q = tmp_path / "s.jsonl"
    q.write_text('{"text": "x \\udc80 y"}\n{"text": oops\n')
    code, out, err = run_cli(capsys, bs, "--input", f"jsonl:{p}", "--input", f"jsonl:{q}", "--tokenizer", tokenizer,
                             "--out", str(tmp_path / "o"), "--no-progress", "--skip-corrupt")
    assert code == 0, err
    assert "51 documents" in out
    assert ("skipped (--skip-corrupt): 1 corrupt records/documents dropped (13 bytes); 700 undecodable compressed "
            "bytes in 1 region(s) skipped") in out
    assert "replaced 1 lone surrogate(s) with U+FFFD in 1 document(s)" in out and "0 corrupt" not in out


def test_cli_help_and_run(tmp_path, corpus, tokenizer):
    for mod in ("data_prep.build_shards", "data_prep.train_tokenizer", "data_prep.embedded", "data_prep.identity"):
        r = subprocess.run([sys.executable, "-m", mod, "--help"], capture_output=True, text=True)
        assert r.returncode == 0 and "usage:" in r.stdout, r.stderr
    r = subprocess.run([sys.executable, "-m", "data_prep.build_shards", "--input", f"pile:{tmp_path}/*.jsonl.zst",
                        "--tokenizer", tokenizer, "--out", str(tmp_path / "cli"), "--workers", "2", "--no-progress"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "27 documents" not in r.stdout and "24 documents" in r.stdout  # 3 x (9 - 1 empty)
    assert "corrupt input: none" in r.stdout
    r = subprocess.run([sys.executable, "-m", "data_prep.build_shards", "--input", f"pile:{tmp_path}/nothing*.zst",
                        "--tokenizer", tokenizer, "--out", str(tmp_path / "cli2")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: input") and "Traceback" not in r.stderr
