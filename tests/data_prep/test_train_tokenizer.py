import json
import re
import subprocess
import sys

import pytest

from data_prep.readers import SourceSpec
from data_prep.train_tokenizer import train_tokenizer


def _many_chars_corpus(path):
    """Text with ~600 distinct characters, so a 300-piece vocabulary cannot hold them all."""
    text = "".join(chr(c) for c in range(0x4E00, 0x4E00 + 600))
    with open(path, "w") as f:
        for i in range(0, len(text), 50):
            f.write(json.dumps({"text": text[i:i + 50] * 3}, ensure_ascii=False) + "\n")


def test_vocab_smaller_than_the_characters_says_what_to_change(tmp_path):
    corpus = tmp_path / "c.jsonl"
    _many_chars_corpus(corpus)
    with pytest.raises(ValueError, match=r"raise --vocab-size to at least \d+ or lower --character-coverage"):
        train_tokenizer([SourceSpec("jsonl", str(corpus))], str(tmp_path / "tok"), vocab_size=300, threads=1,
                        character_coverage=1.0)
    assert not (tmp_path / "tok.model").exists()


def test_cli_reports_the_error_without_a_traceback(tmp_path):
    corpus = tmp_path / "c.jsonl"
    _many_chars_corpus(corpus)
    out = subprocess.run([sys.executable, "-m", "data_prep.train_tokenizer", "--input", f"jsonl:{corpus}",
                          "--out", str(tmp_path / "tok"), "--vocab-size", "300", "--character-coverage", "1.0"],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert "error: vocab_size 300 is smaller than" in out.stderr and "Traceback" not in out.stderr


def _spm_model(tmp_path, name, **ids):
    """A small model trained straight with SentencePiece (not by us), with the given special ids."""
    import pydoc_data.topics
    import sentencepiece as spm

    lines = [l for t in list(pydoc_data.topics.topics.values())[:10] for l in t.split("\n") if l.strip()]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(tmp_path / name), vocab_size=300,
                                   minloglevel=2, num_threads=1, **ids)
    return str(tmp_path / f"{name}.model")


def run_cli(capsys, *argv):
    from molm_ds import cli
    import data_prep.train_tokenizer as tt

    with pytest.raises(SystemExit) as e:
        cli.run(tt.main, list(argv))
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_existing_model_is_validated(tmp_path, capsys, tokenizer):
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"\x00not a sentencepiece model")
    no_eos = _spm_model(tmp_path, "noeos", eos_id=-1)
    llama_like = _spm_model(tmp_path, "llama", unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
    for model, needle in ((str(garbage), "is not a SentencePiece model"), (no_eos, "has no EOS piece"),
                          (str(tmp_path / "missing.model"), "no such file")):
        code, out, err = run_cli(capsys, "--existing", model, "--out", str(tmp_path / "adopted"))
        assert code == 2 and err.count("\n") == 1 and needle in err, err
        assert not (tmp_path / "adopted.model").exists()
    code, out, err = run_cli(capsys, "--existing", llama_like, "--out", str(tmp_path / "adopted"))
    assert code == 0 and "eos 2, pad -1" in out and "special ids differ" in out
    code, out, err = run_cli(capsys, "--existing", tokenizer, "--out", str(tmp_path / "adopted"))
    assert code == 2 and "exists and differs" in err  # an adopted model is not replaced silently
    code, out, err = run_cli(capsys, "--existing", tokenizer, "--out", str(tmp_path / "ours"))
    assert code == 0 and "unk 0, bos 1, eos 2, pad 3" in out and "differ" not in out


def test_training_refuses_to_replace_a_model_and_reports_the_sample(tmp_path, capsys):
    corpus = tmp_path / "c.jsonl"
    import pydoc_data.topics

    with open(corpus, "wb") as f:
        f.write(b"\xef\xbb\xbf")  # a BOM does not make line 1 bad JSON
        for t in list(pydoc_data.topics.topics.values())[:20]:
            f.write(json.dumps({"text": t}).encode() + b"\n")
        f.write(b'{"text": "lone \\ud800 surrogate"}\n{"text": broken\n')
    argv = ["--input", f"jsonl:{corpus}", "--out", str(tmp_path / "tok"), "--vocab-size", "400", "--threads", "1"]
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and re.match(r"error: .*c\.jsonl:22: bad JSON .*--skip-corrupt", err) and err.count("\n") == 1
    code, out, err = run_cli(capsys, *argv, "--skip-corrupt")
    assert code == 0, err
    assert "replaced 1 lone surrogate(s) with U+FFFD in 1 document(s)" in out
    assert "skipped (--skip-corrupt): 1 corrupt records/documents" in out
    before = (tmp_path / "tok.model").read_bytes()
    code, out, err = run_cli(capsys, *argv, "--skip-corrupt", "--vocab-size", "300")
    assert code == 2 and "tok.model exists" in err and (tmp_path / "tok.model").read_bytes() == before


def test_nothing_to_train_on_and_bad_numbers(tmp_path, capsys):
    corpus = tmp_path / "p.jsonl"
    corpus.write_text(json.dumps({"text": "some text", "meta": {"pile_set_name": "ArXiv"}}) + "\n")
    out_ = ["--out", str(tmp_path / "tok"), "--threads", "1"]
    cases = [
        ([f"--input=pile:{corpus}", "--pile-subset", "arxiv"], "did you mean 'ArXiv'?"),
        ([f"--input=pile:{corpus}", "--pile-subset", "Enron Emails"], "no training text.*'Enron Emails' matched no record"),
        ([f"--input=jsonl:{corpus}", "--vocab-size", "0"], "--vocab-size: .*not >= 1"),
        ([f"--input=jsonl:{corpus}", "--character-coverage", "2"], "--character-coverage: .*not in \\(0, 1\\]"),
        ([f"--input=jsonl:{corpus}", "--vocab-size", "5000"], "vocab_size 5000 is more than this sample can fill"),
        ([f"--input=jsonl:{corpus}", "--existing", str(corpus)], "not both"),
    ]
    for argv, needle in cases:
        code, out, err = run_cli(capsys, *argv, *out_)
        assert code == 2 and err.count("\n") == 1 and re.search(needle, err), (argv, err)
        assert "Traceback" not in err and "INTERNAL" not in err and "src/" not in err
