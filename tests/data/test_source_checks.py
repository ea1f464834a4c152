"""The loader refuses what it must not train on: unfinished builds, changed shard files, incomplete
manifests, mixtures of tokenizers, a tokenizer larger than the model; and what data_prep writes reads
back in megatron-core's own IndexedDataset."""

import json
import os
import shlex
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm

import data_prep.build_shards as bs
from data_prep.build_shards import build_shards
from data_prep.indexed_writer import IndexedShardWriter
from data_prep.readers import SourceSpec
from data_prep.train_tokenizer import train_tokenizer
from molm_ds.data import (DataSource, IndexedShard, MixtureLoader, TokenStream, check_sources, shard_prefixes,
                          tokenizer_info)
from molm_ds.errors import DataError
from molm_ds.testing import write_shard

TEXTS = [f"Document {i}: the quick brown fox {i * 7} jumps over the lazy dog.\n" * (1 + i % 3) for i in range(40)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    corpus = d / "train.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return train_tokenizer([SourceSpec("jsonl", str(corpus))], str(d / "tok"), vocab_size=300, threads=1)


@pytest.fixture
def corpus(tmp_path):
    p = tmp_path / "in.jsonl"
    p.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return [SourceSpec("jsonl", str(p))]


def loader(*paths):
    return MixtureLoader([DataSource(p) for p in paths], seq_len=8, micro_batch_size=2, seed=0)


def test_unfinished_build_is_refused_with_the_command_that_finishes_it(tmp_path, corpus, tokenizer, monkeypatch):
    out = tmp_path / "shards"
    real_finish = bs.IndexedShardWriter.finish
    calls = {"n": 0}

    def dying_finish(self):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return real_finish(self)

    monkeypatch.setattr(bs.IndexedShardWriter, "finish", dying_finish)
    with pytest.raises(KeyboardInterrupt):
        build_shards(corpus, tokenizer, str(out), docs_per_shard=5, progress=False)
    assert len(list(out.glob("*.idx"))) == 2  # a partial directory: 2 of 8 shards
    for check in (lambda: loader(str(out)), lambda: check_sources([str(out)]), lambda: tokenizer_info(str(out)),
                  lambda: shard_prefixes(str(out)), lambda: TokenStream(str(out)),
                  lambda: loader(str(out / "part-00000-00000"))):
        with pytest.raises(DataError, match=r"unfinished build_shards output \(2 shards done.*To finish it, rerun the "
                                            r"command that built it: cd .* && python -m data_prep.build_shards"):
            check()
    err = str(pytest.raises(DataError, check_sources, [str(out)]).value)
    command = err.split("rerun the command that built it: ")[1].split(" (it resumes")[0]
    assert command.startswith(f"cd {shlex.quote(os.getcwd())} && python -m data_prep.build_shards ")
    env = dict(os.environ, PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]]),
               PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
    r = subprocess.run(["bash", "-c", command + " --no-progress"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stderr and "8 shards" in r.stdout
    L = loader(str(out))
    assert L.tokenizer.sha256 == tokenizer_info(tokenizer).sha256


def test_shard_files_without_progress_or_manifest_are_refused(tmp_path):
    d = tmp_path / "s"
    write_shard(d)
    os.rename(d / "part-00000.bin", d / "part-00000-00000.bin")
    os.rename(d / "part-00000.idx", d / "part-00000-00000.idx")
    os.remove(d / "manifest.json")
    with pytest.raises(DataError, match="shard files from build_shards but no manifest.json"):
        loader(str(d))


def test_plain_megatron_directory_without_manifest_is_read(tmp_path):
    d = tmp_path / "megatron"
    d.mkdir()
    w = IndexedShardWriter(str(d / "corpus_text_document"), np.uint16)
    w.add_documents(np.arange(3, 103), np.array([50, 50]))
    w.finish()
    assert loader(str(d)).tokenizer is None and TokenStream(str(d)).num_tokens == 100


def test_shard_file_sizes_are_checked_against_the_manifest(tmp_path):
    d = tmp_path / "s"
    write_shard(d)
    loader(str(d))
    with open(d / "part-00000.idx", "ab") as f:
        f.write(b"\0" * 8)  # the index still reads, but it is not the file the build wrote
    with pytest.raises(DataError, match=r"part-00000\.idx is \d+ bytes but the manifest says \d+: the shard was "
                                        "changed or damaged after the build"):
        loader(str(d))
    write_shard(d)
    os.truncate(d / "part-00000.bin", 100)
    with pytest.raises(DataError, match=r"part-00000\.bin is 100 bytes but the manifest says"):
        check_sources([str(d)])
    os.remove(d / "part-00000.bin")
    with pytest.raises(DataError, match=r"part-00000\.bin is missing.*the manifest lists it"):
        TokenStream(str(d))


def _edit_manifest(d, fn):
    man = json.loads((d / "manifest.json").read_text())
    fn(man)
    (d / "manifest.json").write_text(json.dumps(man))


def test_incomplete_manifest_is_refused(tmp_path):
    d = tmp_path / "s"
    for edit, needle in ((lambda m: m["tokenizer"].update(sha256=None), "tokenizer.sha256"),
                         (lambda m: m["shards"][0].pop("tokens"), "has no 'tokens' count"),
                         (lambda m: m.pop("dtype"), "dtype None"),
                         (lambda m: m.update(shards=[]), "lists no shard"),
                         (lambda m: m.update(format=7), "format 7")):
        write_shard(d)
        _edit_manifest(d, edit)
        with pytest.raises(DataError, match=rf"manifest\.json is incomplete: .*{needle}.*rebuild the directory"):
            loader(str(d))


def test_format_1_manifest_sizes_are_derived(tmp_path):
    d = tmp_path / "s"
    write_shard(d)

    def to_format_1(m):
        m["format"] = 1
        for s in m["shards"]:
            del s["bin_bytes"], s["idx_bytes"]

    _edit_manifest(d, to_format_1)
    loader(str(d))
    os.truncate(d / "part-00000.bin", 100)
    with pytest.raises(DataError, match="but the manifest says"):
        loader(str(d))


def test_mixture_of_tokenizers_is_refused(tmp_path):
    a, b = write_shard(tmp_path / "a", seed=0), write_shard(tmp_path / "b", seed=1)
    loader(a, b)  # one tokenizer: fine
    _edit_manifest(tmp_path / "b", lambda m: m["tokenizer"].update(sha256="ab" * 32, model_path="/tok/other.model"))
    with pytest.raises(DataError, match=r"different tokenizers: .*/a \(tokenizer \?, sha256 [0-9a-f]{12}\.\.\., vocab 512\) "
                                        r"vs .*/b \(tokenizer /tok/other\.model, sha256 abababababab\.\.\., vocab 512\)"):
        loader(a, b)


def test_tokenizer_must_fit_the_model_vocabulary(tmp_path):
    d = write_shard(tmp_path / "s", vocab=512)
    with pytest.raises(DataError, match="uses a tokenizer of 512 tokens but the model has vocab_size=500: set "
                                        "model.overrides.vocab_size >= 512"):
        check_sources([d], model_vocab_size=500)
    assert check_sources([d], model_vocab_size=512).vocab_size == 512
    assert check_sources([d], model_vocab_size=640).eos_id == 2  # a padded embedding is fine


def test_megatron_core_reads_what_build_shards_writes(tmp_path, corpus, tokenizer):
    indexed_dataset = pytest.importorskip("megatron.core.datasets.indexed_dataset")
    out = tmp_path / "shards"
    build_shards(corpus, tokenizer, str(out), docs_per_shard=7, progress=False)
    sp = spm.SentencePieceProcessor(model_file=tokenizer)
    expect = [sp.encode(t) + [sp.eos_id()] for t in TEXTS]
    got = []
    for prefix in shard_prefixes(str(out)):
        ds = indexed_dataset.IndexedDataset(prefix)
        ours = IndexedShard(prefix)
        assert len(ds) == len(ours) and list(ds.document_indices) == list(range(len(ours) + 1))
        assert list(ds.sequence_lengths) == list(ours.sequence_lengths)
        for i in range(len(ds)):
            assert ds[i].dtype == np.uint16
            got.append(ds[i].tolist())
    assert got == expect


def test_a_shard_overwritten_with_garbage_of_the_same_size_is_refused(tmp_path, corpus, tokenizer):
    out = tmp_path / "shards"
    build_shards(corpus, tokenizer, str(out), docs_per_shard=100, progress=False)
    check_sources([str(out)])  # intact
    man = json.loads((out / "manifest.json").read_text())
    assert all("bin_sample_sha256" in s and "idx_sample_sha256" in s for s in man["shards"])
    for ext in (".bin", ".idx"):
        f = out / (man["shards"][0]["prefix"] + ext)
        good = f.read_bytes()
        f.write_bytes(np.random.default_rng(0).integers(0, 256, len(good), dtype=np.uint8).tobytes())
        with pytest.raises(DataError, match=f"{f.name} does not hold the bytes the manifest recorded"):
            check_sources([str(out)])
        f.write_bytes(good)


@pytest.mark.parametrize("damage, needle", [
    ("negative_length", "negative sequence length"),
    ("pointer_outside", "outside the .bin"),
    ("doc_index", "document index"),
    ("longer", "longer than its header"),
])
def test_a_damaged_index_is_refused_before_it_is_read(tmp_path, damage, needle):
    from molm_ds.data.indexed import HEADER_BYTES

    write_shard(tmp_path, n_docs=4, doc_len=10)
    idx = tmp_path / "part-00000.idx"
    b = bytearray(idx.read_bytes())
    n = 4
    if damage == "negative_length":
        b[HEADER_BYTES:HEADER_BYTES + 4] = np.int32(-3).tobytes()
    elif damage == "pointer_outside":
        off = HEADER_BYTES + 4 * n + 8 * (n - 1)
        b[off:off + 8] = np.int64(10**6).tobytes()
    elif damage == "doc_index":
        off = HEADER_BYTES + 12 * n + 8 * n
        b[off:off + 8] = np.int64(1).tobytes()
    else:
        b += b"\0" * 8
    idx.write_bytes(bytes(b))
    with pytest.raises(DataError, match=needle):
        IndexedShard(tmp_path / "part-00000")


def test_a_tokenizer_that_changed_since_the_build_is_refused(tmp_path, corpus, tokenizer):
    import shutil

    tok = tmp_path / "tok.model"
    shutil.copy(tokenizer, tok)
    out = tmp_path / "shards"
    build_shards(corpus, str(tok), str(out), docs_per_shard=100, progress=False)
    check_sources([str(out)])
    tok.write_bytes(tok.read_bytes() + b"\0")  # damaged in place
    with pytest.raises(DataError, match=f"tokenizer {tok} changed since .* was built with it"):
        check_sources([str(out)])


def test_commands_refuse_another_tokenizer_than_the_manifests(tmp_path, corpus, tokenizer):
    from molm_ds.tokenizer import check_run_tokenizer

    out = tmp_path / "shards"
    build_shards(corpus, tokenizer, str(out), docs_per_shard=100, progress=False)
    job = {"data": {"sources": [{"path": str(out)}]}}
    check_run_tokenizer(tokenizer, job)  # the one it was built with
    other = tmp_path / "other.model"
    other.write_bytes(open(tokenizer, "rb").read() + b"x")
    with pytest.raises(DataError, match=f"--tokenizer {other} .* is not the tokenizer the model was trained with"):
        check_run_tokenizer(str(other), job)
    check_run_tokenizer(str(other), {"data": {"sources": []}})  # nothing recorded: nothing to compare
