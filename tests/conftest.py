"""Fixtures the whole suite shares, each expensive artefact built once per session (helpers they use:
``molm_ds.testing``). Session-scoped artefacts are read-only by convention: a test that changes one
makes its own copy (``write_shard(tmp_path / ...)``)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
# One thread per test process (the README's advice for a busy CPU machine): two pytest workers with torch's
# default threads each put 4 threads on 2 cores, where OpenMP's threads spin instead of working; in-process
# tests took 131 s of wall with the defaults and 92 s with one thread. Launched commands set it themselves.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def shard(tmp_path_factory) -> str:
    """The synthetic token shard (``molm_ds.testing.write_shard`` defaults) the tiny job trains on."""
    from molm_ds.testing import write_shard

    return write_shard(tmp_path_factory.mktemp("shard"))


@pytest.fixture(scope="session")
def run_tokenizer(tmp_path_factory) -> str:
    """A tokenizer as data_prep.train_tokenizer trains them (BPE, byte fallback, identity, 512 pieces) on
    text that ships with Python; data_prep's special ids (unk 0, <s> 1, </s> 2, <pad> 3)."""
    from data_prep.readers import SourceSpec
    from data_prep.train_tokenizer import train_tokenizer
    from molm_ds.testing import corpus_lines

    d = tmp_path_factory.mktemp("tok")
    text = d / "corpus.txt"
    text.write_text("\n".join(corpus_lines()))
    return train_tokenizer([SourceSpec("lines", str(text))], str(d / "molm"), vocab_size=512, threads=1)


@pytest.fixture(scope="session")
def default_tokenizer(tmp_path_factory) -> str:
    """SentencePiece's defaults (nmt_nfkc, dummy prefix, extra whitespace removed), as an adopted model has."""
    import sentencepiece as spm

    from molm_ds.testing import corpus_lines

    d = tmp_path_factory.mktemp("tok_default")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus_lines()), model_prefix=str(d / "m"), vocab_size=600,
                                   model_type="bpe", num_threads=1, minloglevel=2)
    return str(d / "m.model")


# ---- scheduling: the longest files first -----------------------------------------------------------------
# `make test` hands whole files to two pytest-xdist workers in collection order (--no-loadscope-reorder): a
# long file started last leaves the other worker idle, so files are collected longest first, by the wall
# seconds a full run recorded (tests/durations.json; files not in it keep their order, after the others).
# `make durations` rewrites the file from a full run. Only the order depends on it, never a result.
DURATIONS = os.path.join(os.path.dirname(__file__), "durations.json")


def pytest_addoption(parser):
    parser.addoption("--record-durations", metavar="FILE", default=None,
                     help="write each test file's wall seconds (setup + call + teardown) to FILE as JSON")


def pytest_collection_modifyitems(session, config, items):
    import json

    try:
        with open(DURATIONS) as f:
            seconds = json.load(f)
    except (OSError, ValueError):
        return
    first = {}
    for i, item in enumerate(items):
        first.setdefault(item.location[0], i)
    items.sort(key=lambda it: (-seconds.get(it.location[0], 0.0), first[it.location[0]]))


_file_seconds: dict[str, float] = {}


def pytest_runtest_logreport(report):
    path = report.nodeid.split("::", 1)[0]
    _file_seconds[path] = _file_seconds.get(path, 0.0) + report.duration


def pytest_sessionfinish(session, exitstatus):
    out = session.config.getoption("--record-durations")
    if out and not hasattr(session.config, "workerinput"):  # the controller, which sees every worker's reports
        import json

        with open(out, "w") as f:
            json.dump({k: round(v, 1) for k, v in sorted(_file_seconds.items(), key=lambda kv: -kv[1])}, f, indent=0)
            f.write("\n")
