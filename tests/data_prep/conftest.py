import json
import os

import pytest

from data_prep.readers import SourceSpec
from tests.data_prep.pile_corpus import docs_for, write_pile
from data_prep.train_tokenizer import train_tokenizer

DOCS = [
    "Hello world. The quick brown fox jumps over the lazy dog.",
    "Ünïcödé: naïve café, 你好世界, emoji 🙂 and a tab\there.",
    "def f(x):\n    return x + 1\n\nclass A:\n    pass",
    "Line one\nLine two\nLine three",
]


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    """A small BPE tokenizer (vocab 512) trained on pydoc prose plus the docs above."""
    import pydoc_data.topics

    d = tmp_path_factory.mktemp("tok")
    corpus = d / "train.jsonl"
    with open(corpus, "w") as f:
        for t in list(pydoc_data.topics.topics.values())[:30] + DOCS:
            f.write(json.dumps({"text": t}) + "\n")
    return train_tokenizer([SourceSpec("jsonl", str(corpus))], os.path.join(d, "tok"), vocab_size=512, threads=1)


@pytest.fixture
def corpus(tmp_path):
    specs = []
    for i in range(3):
        p = tmp_path / f"{i:02d}.jsonl.zst"
        write_pile(p, docs_for(i))
        specs.append(SourceSpec("pile", str(p)))
    return specs


@pytest.fixture(autouse=True)
def _no_inherited_launcher_env(monkeypatch):
    """An in-process training test earlier in the same pytest worker leaves RANK / WORLD_SIZE / MASTER_* in
    the environment; every mpirun rank started from here would inherit RANK=0 and take itself for rank 0.
    Drop them for the test (monkeypatch puts them back)."""
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    yield
