"""molm_ds.hf.tokenizer: the exported tokenizer gives SentencePiece's ids on unicode, code and
whitespace, loaded with AutoTokenizer offline, and declares the right special tokens."""

from __future__ import annotations

import sysconfig
import os

import pytest

TEXTS = [
    "Hello world",
    "naïve café — “quotes” 日本語のテキスト 한국어 Ελληνικά emoji 🎉👍🏽 math ∀x∈ℝ: √x ≥ 0",
    "def f(x):\n\tif x:\n        return x ** 2  # indented with spaces\n\treturn None\n",
    "   leading, trailing   \n\n\n   ",
    "mixed\ttabs\t\tand  double  spaces\r\nwindows line end",
    "<s> and </s> and <pad> and <unk> are text here, as in HTML <s>struck</s>",
    "digits 1234567890 3.14159 1e-10 0xDEADBEEF",
    "\u2581 a literal lower one eighth block",
    "",
    " ",
    "\x00\x01 control characters \x7f",
]


def _stdlib_sample() -> list[str]:
    lib = sysconfig.get_paths()["stdlib"]
    out = []
    for name in ("difflib.py", "heapq.py", "string.py"):
        with open(os.path.join(lib, name), encoding="utf-8") as f:
            out.append(f.read()[:8000])
    return out


@pytest.fixture(scope="module", params=["run", "default"])
def exported(request, tmp_path_factory, run_tokenizer, default_tokenizer):
    from molm_ds.hf.tokenizer import write_tokenizer

    path = run_tokenizer if request.param == "run" else default_tokenizer
    d = tmp_path_factory.mktemp(f"hf_tok_{request.param}")
    write_tokenizer(path, str(d), model_max_length=64)
    return path, str(d)


def test_ids_identical_to_sentencepiece(exported, monkeypatch):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path, d = exported
    sp = spm.SentencePieceProcessor(model_file=path)
    tok = AutoTokenizer.from_pretrained(d)
    for text in TEXTS + _stdlib_sample():
        want = sp.encode(text)
        assert tok(text)["input_ids"] == want, repr(text[:60])
        assert tok.encode(text) == want
    batch = tok(TEXTS[:3])["input_ids"]
    assert batch == [sp.encode(t) for t in TEXTS[:3]]


def test_decode_round_trip_of_the_run_tokenizer(run_tokenizer, tmp_path):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    from molm_ds.hf.tokenizer import write_tokenizer

    write_tokenizer(run_tokenizer, str(tmp_path), model_max_length=64)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    sp = spm.SentencePieceProcessor(model_file=run_tokenizer)
    for text in TEXTS[:7]:  # the run's tokenizer (identity, byte fallback) decodes back exactly
        assert tok.decode(tok.encode(text)) == sp.decode(sp.encode(text)) == text


def test_special_tokens(run_tokenizer, tmp_path):
    import json

    from transformers import AutoTokenizer

    from molm_ds.hf.tokenizer import write_tokenizer

    sp = write_tokenizer(run_tokenizer, str(tmp_path), model_max_length=64)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    # data_prep's ids: unk 0, <s> 1, </s> 2, <pad> 3; documents start after EOS, so BOS = EOS
    assert (sp.eos_id, sp.pad_id, sp.unk_id, sp.bos_id) == (2, 3, 0, 2)
    assert (tok.eos_token_id, tok.bos_token_id, tok.pad_token_id, tok.unk_token_id) == (2, 2, 3, 0)
    assert tok.model_max_length == 64
    assert tok("abc")["input_ids"] == tok.encode("abc", add_special_tokens=False)  # nothing added around
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["split_special_tokens"] is True
    assert (tmp_path / "tokenizer.model").read_bytes() == open(run_tokenizer, "rb").read()


def test_an_export_tokenizer_has_no_length_limit(run_tokenizer, tmp_path):
    """No position embedding: a document longer than the trained context is no error, so transformers must
    not warn "Token indices sequence length is longer ... indexing errors" (it did, on every lm-eval run).
    The same text through a tokenizer limited to 64 shows the warning is caught here."""
    import logging

    from transformers import AutoTokenizer

    from molm_ds.hf.tokenizer import write_tokenizer

    class Catch(logging.Handler):
        def __init__(self):
            super().__init__()
            self.lines = []

        def emit(self, record):
            self.lines.append(record.getMessage())

    text = " ".join(TEXTS) * 20
    seen = {}
    for limit in (None, 64):
        d = tmp_path / str(limit)
        write_tokenizer(run_tokenizer, str(d), model_max_length=limit)
        tok = AutoTokenizer.from_pretrained(str(d))
        catch = Catch()
        logging.getLogger("transformers").addHandler(catch)  # transformers does not propagate to the root
        try:
            assert len(tok(text)["input_ids"]) > 1000
        finally:
            logging.getLogger("transformers").removeHandler(catch)
        seen[limit] = (tok.model_max_length, any("indexing errors" in line for line in catch.lines))
    assert seen[None][0] > 10**9 and not seen[None][1]
    assert seen[64] == (64, True)


def test_user_symbols(tmp_path):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    from molm_ds.hf.tokenizer import write_tokenizer
    from molm_ds.testing import corpus_lines

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus_lines()), model_prefix=str(tmp_path / "u"), vocab_size=600, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        user_defined_symbols=["<tab>", "def "], num_threads=1, minloglevel=2)
    write_tokenizer(str(tmp_path / "u.model"), str(tmp_path / "hf"), model_max_length=64)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "u.model"))
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    for text in ["a <tab> b<tab>c", "def f(): pass\n  def g(): pass"] + TEXTS[:4]:
        assert tok.encode(text) == sp.encode(text), text


def test_not_a_model(tmp_path):
    from molm_ds.errors import DataError
    from molm_ds.hf.tokenizer import build_tokenizer

    bad = tmp_path / "x.model"
    bad.write_bytes(b"not a protobuf at all \xff\xfe")
    with pytest.raises(DataError, match="not a SentencePiece model"):
        build_tokenizer(str(bad))
