import json
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
