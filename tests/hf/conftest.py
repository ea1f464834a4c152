"""Shared by tests/hf: SentencePiece models trained here (data_prep's recipe, and SentencePiece's own
defaults) on text that ships with Python."""

from __future__ import annotations

import os
import sysconfig

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")


def corpus_lines() -> list[str]:
    import pydoc_data.topics

    lines = [l for t in pydoc_data.topics.topics.values() for l in t.split("\n") if l.strip()]
    lib = sysconfig.get_paths()["stdlib"]
    for name in ("argparse.py", "json/decoder.py", "textwrap.py"):
        with open(os.path.join(lib, name), encoding="utf-8") as f:
            lines += [l for l in f.read().split("\n") if l.strip()]
    return lines


@pytest.fixture(scope="session")
def run_tokenizer(tmp_path_factory) -> str:
    """A tokenizer as data_prep.train_tokenizer trains them (BPE, byte fallback, identity, 512 pieces)."""
    from data_prep.readers import SourceSpec
    from data_prep.train_tokenizer import train_tokenizer

    d = tmp_path_factory.mktemp("tok")
    text = d / "corpus.txt"
    text.write_text("\n".join(corpus_lines()))
    return train_tokenizer([SourceSpec("lines", str(text))], str(d / "molm"), vocab_size=512, threads=1)


@pytest.fixture(scope="session")
def default_tokenizer(tmp_path_factory) -> str:
    """SentencePiece's defaults (nmt_nfkc, dummy prefix, extra whitespace removed), as an adopted model has."""
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("tok_default")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus_lines()), model_prefix=str(d / "m"), vocab_size=600,
                                   model_type="bpe", num_threads=1, minloglevel=2)
    return str(d / "m.model")
