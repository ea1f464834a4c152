"""What data_prep requires of a SentencePiece model, and the record of it that manifests carry.

Tokenizers trained by ``data_prep.train_tokenizer`` have ``TRAINED_IDS``: ``<unk>`` 0, ``<s>`` 1,
``</s>`` 2, ``<pad>`` 3. Of an existing model (``--existing``, ``build_shards --tokenizer``) we
require only what the shards and the loader depend on:
- it loads as a SentencePiece model and encodes text;
- it has an EOS piece (appended to every document) that is a control symbol, so no text ever
  encodes to it and every EOS in a shard is a document boundary;
- its special ids that exist (unk, bos, eos, pad; -1 = absent) are distinct.
Other ids are fine: the manifest records them and the loader reads them from there.
"""

from __future__ import annotations

import os
import re

from data_prep.identity import file_sha256
from molm_ds.errors import DataError

TRAINED_IDS = {"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": 3}


def spm_message(exc: BaseException) -> str:
    """SentencePiece's error text without its C++ source location: 'INTERNAL: src/x.cc(12) [cond] msg' -> 'msg'."""
    text = " ".join(str(exc).split())
    text = re.sub(r"^[A-Z_]+: ", "", text)
    text = re.sub(r"^\S+\.cc\(\d+\) \[[^\]]*\] ?", "", text)
    return text or type(exc).__name__


def load(path: str):
    """The SentencePieceProcessor of ``path``; DataError when it is missing or not a model."""
    import sentencepiece as spm

    if not os.path.isfile(path):
        raise DataError(f"tokenizer {path}: no such file (train one with python -m data_prep.train_tokenizer)")
    try:
        return spm.SentencePieceProcessor(model_file=path)
    except (RuntimeError, OSError) as e:
        raise DataError(f"tokenizer {path} is not a SentencePiece model ({spm_message(e)})") from None


def ids(sp) -> dict:
    return {"unk_id": sp.unk_id(), "bos_id": sp.bos_id(), "eos_id": sp.eos_id(), "pad_id": sp.pad_id()}


def check(sp, path: str) -> None:
    """Raise DataError unless ``sp`` meets the requirements in the module docstring."""
    special = ids(sp)
    eos = special["eos_id"]
    if eos < 0:
        raise DataError(f"tokenizer {path} has no EOS piece, which build_shards appends to every document: train "
                        "one with python -m data_prep.train_tokenizer (EOS id 2) or use a model that has one")
    if not sp.is_control(eos):
        raise DataError(f"tokenizer {path}: its EOS piece {sp.id_to_piece(eos)!r} (id {eos}) is not a control "
                        "symbol, so text could encode to it; use a model whose EOS is a control piece")
    present = {k: v for k, v in special.items() if v >= 0}
    if len(set(present.values())) != len(present):
        raise DataError(f"tokenizer {path}: special ids are not distinct ({present})")
    try:
        sp.encode("probe: text, 123")
    except Exception as e:  # a model that loads but cannot encode is unusable whatever the reason
        raise DataError(f"tokenizer {path} loads but cannot encode text ({spm_message(e)})") from None


# Trainer options SentencePiece records in the model that describe the machine and the command, not the
# tokenizer: the output path as spelled and the CPU count. Cleared, two builds of the same text at different
# paths or on different machines give byte-identical models.
MACHINE_FIELDS = ("model_prefix", "num_threads", "input")


def canonical_bytes(data: bytes) -> bytes:
    """A serialized model with ``MACHINE_FIELDS`` cleared (pieces, normalizer and every other option kept)."""
    from sentencepiece import sentencepiece_model_pb2

    m = sentencepiece_model_pb2.ModelProto()
    m.ParseFromString(data)
    for name in MACHINE_FIELDS:
        m.trainer_spec.ClearField(name)
    return m.SerializeToString()


def tokenizer_record(model_path: str) -> dict:
    """The manifest's ``tokenizer`` entry for a checked model."""
    sp = load(model_path)
    check(sp, model_path)
    return {"model_path": os.path.abspath(model_path), "sha256": file_sha256(model_path),
            "vocab_size": sp.vocab_size(), **ids(sp)}
