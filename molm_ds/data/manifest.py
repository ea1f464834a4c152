"""Finding shards and reading the manifests that data_prep writes.

A *source path* given to the loader is one of
- a shard directory written by ``python -m data_prep.build_shards`` (holds ``manifest.json`` and
  ``part-*.bin/.idx``; the manifest fixes the shard order),
- any directory of Megatron ``*.idx``/``*.bin`` pairs without a manifest (sorted by name), or
- a single Megatron prefix (``PREFIX.bin`` + ``PREFIX.idx``).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os

MANIFEST = "manifest.json"


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of a shard directory, of an embedded-corpus directory, or a manifest file itself."""
    path = os.fspath(path)
    file = path if path.endswith(".json") else os.path.join(path, MANIFEST)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file} not found: expected a directory written by data_prep "
                                "(python -m data_prep.build_shards or python -m data_prep.embedded)")
    with open(file) as f:
        return json.load(f)


def shard_prefixes(path: str | os.PathLike) -> list[str]:
    """The shard prefixes (without .bin/.idx) that make up one data source, in order."""
    path = os.fspath(path)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, MANIFEST)):
            man = read_manifest(path)
            if "shards" not in man:
                raise ValueError(f"{path}/{MANIFEST} is not a shard manifest (no 'shards'); for an embedded "
                                 "corpus directory pass DIR/shards/<domain>")
            return [os.path.join(path, s["prefix"]) for s in man["shards"]]
        prefixes = sorted(p[:-4] for p in glob.glob(os.path.join(path, "*.idx")))
        if not prefixes:
            raise FileNotFoundError(f"{path}: no manifest.json and no *.idx shards in this directory")
        return prefixes
    if os.path.exists(path + ".idx"):
        return [path]
    raise FileNotFoundError(f"{path}: neither a shard directory nor a prefix with {path}.idx/.bin")


@dataclasses.dataclass(frozen=True)
class TokenizerInfo:
    vocab_size: int
    eos_id: int
    bos_id: int
    pad_id: int
    unk_id: int
    model_path: str | None
    sha256: str | None


def tokenizer_info(path: str | os.PathLike) -> TokenizerInfo:
    """Vocabulary size and special-token ids of the tokenizer behind some data.

    ``path``: a shard directory, an embedded-corpus directory (``DIR`` of ``data_prep.embedded``),
    a manifest file, or a SentencePiece ``.model`` file.
    """
    path = os.fspath(path)
    if path.endswith(".model"):
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=path)
        from hashlib import sha256

        with open(path, "rb") as f:
            digest = sha256(f.read()).hexdigest()
        return TokenizerInfo(sp.vocab_size(), sp.eos_id(), sp.bos_id(), sp.pad_id(), sp.unk_id(),
                             os.path.abspath(path), digest)
    tok = read_manifest(path)["tokenizer"]
    model = tok.get("model_path")
    if model and not os.path.isabs(model):
        base = path if os.path.isdir(path) else os.path.dirname(path)
        model = os.path.normpath(os.path.join(base, model))
    return TokenizerInfo(int(tok["vocab_size"]), int(tok["eos_id"]), int(tok["bos_id"]), int(tok["pad_id"]),
                         int(tok["unk_id"]), model, tok.get("sha256"))
