"""The tokenizer of a run, for the commands that turn text into ids and back (evaluate, generate, export).

    tok = load_tokenizer("data/embedded/tokenizer.model")   # or an exported directory
    ids = tok.encode("def f(x):")                            # SentencePiece ids, nothing added
    text = tok.decode(ids)

A SentencePiece ``.model`` file, or a directory holding one (``tokenizer.model``, as exports do); a
directory with only Hugging Face tokenizer files (a released checkpoint) is read with transformers.
``find_run_tokenizer(job)`` finds the model a trainer checkpoint was trained with: the manifests of its
job's data sources name it. ``check_run_tokenizer(path, job)`` refuses a SentencePiece model whose
SHA-256 is not the one those manifests recorded (another or a damaged tokenizer would turn the
model's ids into the wrong text without a word).
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

from molm_ds.errors import ConfigError, DataError
from data_prep.identity import file_sha256  # the one full-file checksum (the manifests record it)

__all__ = ["Tokenizer", "load_tokenizer", "find_run_tokenizer", "check_run_tokenizer", "file_sha256"]


class Tokenizer:
    """encode / decode with the special ids the commands need. ``model_path``: the SentencePiece file
    (None for a Hugging Face tokenizer)."""

    def __init__(self, *, encode, decode, eos_id: int, pad_id: int, vocab_size: int, model_path: Optional[str], name: str):
        self._encode, self._decode = encode, decode
        self.eos_id, self.pad_id, self.vocab_size = eos_id, pad_id, vocab_size
        self.model_path, self.name = model_path, name

    def encode(self, text: str) -> list[int]:
        return self._encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._decode([int(i) for i in ids])


def _sentencepiece(path: str) -> Tokenizer:
    import sentencepiece as spm

    try:
        sp = spm.SentencePieceProcessor(model_file=path)
    except (RuntimeError, OSError) as e:
        raise DataError(f"tokenizer {path} is not a SentencePiece model ({' '.join(str(e).split())})") from None
    if sp.eos_id() < 0:
        raise DataError(f"tokenizer {path} has no EOS piece; molm-ds models end every document with EOS")
    pad = sp.pad_id() if sp.pad_id() >= 0 else sp.eos_id()
    return Tokenizer(encode=sp.encode, decode=sp.decode, eos_id=sp.eos_id(), pad_id=pad, vocab_size=sp.vocab_size(),
                     model_path=os.path.abspath(path), name=path)


def _hf(directory: str) -> Tokenizer:
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ConfigError(f"{directory} has Hugging Face tokenizer files only; reading them needs transformers "
                          "(pip install 'molm-ds[hf]') or pass --tokenizer M.model") from None
    tok = AutoTokenizer.from_pretrained(directory)
    if tok.eos_token_id is None:
        raise DataError(f"the tokenizer in {directory} has no EOS token")
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return Tokenizer(encode=lambda t: tok.encode(t, add_special_tokens=False), decode=lambda ids: tok.decode(ids),
                     eos_id=tok.eos_token_id, pad_id=pad, vocab_size=len(tok), model_path=None, name=directory)


def load_tokenizer(path: str) -> Tokenizer:
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "tokenizer.model")):
            return _sentencepiece(os.path.join(path, "tokenizer.model"))
        if os.path.isfile(os.path.join(path, "tokenizer.json")):
            return _hf(path)
        raise DataError(f"{path}: no tokenizer.model or tokenizer.json in this directory; pass --tokenizer M.model")
    if not os.path.isfile(path):
        raise DataError(f"tokenizer {path}: no such file (a SentencePiece .model, e.g. data/embedded/tokenizer.model)")
    return _sentencepiece(path)


def find_run_tokenizer(job: dict) -> Optional[str]:
    """The SentencePiece model named by the manifests of a checkpoint job's data sources (None when they
    name none, or it is no longer there)."""
    from molm_ds.data.manifest import tokenizer_info

    for src in ((job.get("data") or {}).get("sources") or []):
        try:
            path = tokenizer_info(src["path"]).model_path
        except (DataError, KeyError, TypeError, OSError):
            continue
        if path and os.path.isfile(path):
            return path
    return None


def _sentencepiece_file(path: str) -> Optional[str]:
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.model")
    return path if os.path.isfile(path) else None


def check_run_tokenizer(path: Optional[str], job: dict, *, what: str = "--tokenizer") -> None:
    """DataError when ``path`` (a SentencePiece model, or a directory holding tokenizer.model) is not the
    tokenizer the checkpoint's training data was built with, by the SHA-256 its data manifests recorded.
    Nothing to compare (no manifest, no recorded hash, a Hugging Face tokenizer) is not an error."""
    from molm_ds.data.manifest import tokenizer_info

    file = _sentencepiece_file(path) if path else None
    if file is None:
        return
    recorded = None
    for src in ((job.get("data") or {}).get("sources") or []):
        try:
            info = tokenizer_info(src["path"])
        except (DataError, KeyError, TypeError, OSError):
            continue
        if info.sha256:
            recorded = (src["path"], info)
            break
    if recorded is None:
        return
    have = file_sha256(file)
    source, info = recorded
    if have != info.sha256:
        raise DataError(f"{what} {file} (sha256 {have[:12]}...) is not the tokenizer the model was trained with: "
                        f"the manifest of {source} records sha256 {info.sha256[:12]}... "
                        f"({info.model_path or 'path not recorded'}); pass that tokenizer with --tokenizer, or "
                        "restore the file")
