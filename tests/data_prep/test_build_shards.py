"""Tokenisation to shards: token counts vs SentencePiece, corrupt input, resume, parallel == serial."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm
import zstandard

import data_prep.build_shards as bs
from data_prep.build_shards import build_shards
from data_prep.readers import CorruptInputError, SourceSpec
from molm_ds.data import IndexedShard, shard_prefixes

LONG = "A sentence that repeats to exceed the sentence limit. " * 400  # > SentencePiece's 4192 bytes


def docs_for(i):
    return [f"Document {i}.{j}: ünïcödé 你好 and code `x = {j}`\r\nsecond line" for j in range(7)] + ["", LONG]


def write_pile(path, docs, extra=b""):
    lines = b"".join(json.dumps({"text": t, "meta": {"pile_set_name": "Pile-CC"}}).encode() + b"\n" for t in docs)
    path.write_bytes(zstandard.ZstdCompressor().compress(lines + extra))


def read_all(out_dir):
    return [IndexedShard(p)[i].tolist() for p in shard_prefixes(out_dir) for i in range(len(IndexedShard(p)))]


@pytest.fixture
def corpus(tmp_path):
    specs = []
    for i in range(3):
        p = tmp_path / f"{i:02d}.jsonl.zst"
        write_pile(p, docs_for(i))
        specs.append(SourceSpec("pile", str(p)))
    return specs


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


def test_changed_settings_refused(tmp_path, corpus, tokenizer):
    build_shards(corpus, tokenizer, str(tmp_path / "o"), docs_per_shard=4, progress=False)
    with pytest.raises(ValueError, match="different settings"):
        build_shards(corpus, tokenizer, str(tmp_path / "o"), docs_per_shard=5, progress=False)
    man = build_shards(corpus, tokenizer, str(tmp_path / "o"), docs_per_shard=5, overwrite=True, progress=False)
    assert len(man["shards"]) == 6


def test_corrupt_line_stops_or_is_counted(tmp_path, tokenizer):
    p = tmp_path / "c.jsonl.zst"
    write_pile(p, ["good one", "good two"], extra=b'{"text": "oops\n{"text": "after"}\n')
    with pytest.raises(CorruptInputError, match=r"c\.jsonl\.zst:3"):
        build_shards([SourceSpec("pile", str(p))], tokenizer, str(tmp_path / "x"), progress=False)
    man = build_shards([SourceSpec("pile", str(p))], tokenizer, str(tmp_path / "y"), skip_corrupt=True, progress=False)
    assert man["skipped_corrupt"] == 1 and man["documents"] == 3
    assert "c.jsonl.zst:3" in man["sources"][0]["errors"][0]


def test_cli_help_and_run(tmp_path, corpus, tokenizer):
    for mod in ("data_prep.build_shards", "data_prep.train_tokenizer", "data_prep.embedded"):
        r = subprocess.run([sys.executable, "-m", mod, "--help"], capture_output=True, text=True)
        assert r.returncode == 0 and "usage:" in r.stdout, r.stderr
    r = subprocess.run([sys.executable, "-m", "data_prep.build_shards", "--input", f"pile:{tmp_path}/*.jsonl.zst",
                        "--tokenizer", tokenizer, "--out", str(tmp_path / "cli"), "--workers", "2", "--no-progress"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "27 documents" not in r.stdout and "24 documents" in r.stdout  # 3 x (9 - 1 empty)
