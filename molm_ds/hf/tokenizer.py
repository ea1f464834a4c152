"""A SentencePiece model as Hugging Face tokenizer files with the same ids.

    write_tokenizer("data/embedded/tokenizer.model", "export_dir", model_max_length=2048)

writes ``tokenizer.json`` (a ``tokenizers`` fast tokenizer), ``tokenizer_config.json``,
``special_tokens_map.json`` and a copy of the model as ``tokenizer.model``. ``AutoTokenizer`` loads the
directory offline with no SentencePiece installed.

How SentencePiece's encoding is reproduced (read from the model's own proto, so adopted models work too):
- normaliser: the precompiled character map (none for ``identity``), extra-whitespace removal, the
  dummy "▁" prefix, spaces -> "▁", each only when the model's ``normalizer_spec`` asks for it;
- BPE: the vocabulary with every merge ``(a, b) -> a+b`` of two normal pieces, ranked by the score of
  the merged piece (SentencePiece merges the adjacent pair whose result scores highest); Unigram: the
  pieces with their scores; byte fallback to the ``<0xNN>`` pieces, unknown runs fused into ``<unk>``;
- control pieces (``<s>``, ``</s>``, ``<pad>``) are special tokens that text never produces:
  ``split_special_tokens`` makes the literal text "</s>" encode as characters, as SentencePiece does;
- user-defined pieces are matched in the text before the model, as SentencePiece matches them.
Nothing is added around the ids (no BOS, no EOS): like ``SentencePieceProcessor.encode``.

Special tokens: molm-ds shards hold documents followed by EOS and no BOS, so a document's start context is
EOS; the files name EOS as ``bos_token`` too (GPT-2's convention), and harnesses that prefix a BOS
(lm-evaluation-harness) condition on what the model saw. PAD is the model's pad piece, else EOS.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from typing import Optional

from molm_ds.errors import ConfigError, DataError

__all__ = ["SpecialTokens", "special_tokens", "build_tokenizer", "write_tokenizer"]

_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6  # ModelProto.SentencePiece.Type
_BPE, _UNIGRAM = 2, 1  # TrainerSpec.ModelType
SPACE = "\u2581"


@dataclass(frozen=True)
class SpecialTokens:
    """Ids and pieces of the special tokens an export declares (``bos`` = EOS: see the module docstring)."""

    eos_id: int
    eos: str
    pad_id: int
    pad: str
    unk_id: Optional[int]
    unk: Optional[str]

    @property
    def bos_id(self) -> int:
        return self.eos_id

    @property
    def bos(self) -> str:
        return self.eos


def _proto(path: str):
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError as e:  # the proto module needs protobuf
        raise ConfigError(f"reading {path} needs the protobuf package ({e}); pip install protobuf") from None
    m = pb.ModelProto()
    try:
        with open(path, "rb") as f:
            m.ParseFromString(f.read())
    except OSError as e:
        raise DataError(f"tokenizer {path}: {e.strerror}") from None
    except Exception as e:  # protobuf's DecodeError
        raise DataError(f"tokenizer {path} is not a SentencePiece model ({e})") from None
    if not m.pieces:
        raise DataError(f"tokenizer {path} is not a SentencePiece model (no pieces)")
    return m


def special_tokens(path: str) -> SpecialTokens:
    m = _proto(path)
    t = m.trainer_spec
    pieces = [p.piece for p in m.pieces]
    if t.eos_id < 0:
        raise DataError(f"tokenizer {path} has no EOS piece; molm-ds models end every document with EOS")
    pad = t.pad_id if t.pad_id >= 0 else t.eos_id
    unk = t.unk_id if t.unk_id >= 0 else None
    return SpecialTokens(t.eos_id, pieces[t.eos_id], pad, pieces[pad], unk, pieces[unk] if unk is not None else None)


def _normalizer(m):
    from tokenizers import Regex, normalizers

    spec = m.normalizer_spec
    if m.trainer_spec.treat_whitespace_as_suffix:
        raise DataError("tokenizer uses treat_whitespace_as_suffix, which the Hugging Face conversion does not support")
    steps = []
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex(" {2,}"), " "), normalizers.Replace(Regex("^ +| +$"), "")]
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend(SPACE))
    if spec.escape_whitespaces:
        steps.append(normalizers.Replace(" ", SPACE))
    return normalizers.Sequence(steps) if steps else None


def _bpe_merges(m) -> list[tuple[str, str]]:
    normal = {p.piece: (i, p.score) for i, p in enumerate(m.pieces) if p.type == _NORMAL}
    merges = []
    for piece, (i, score) in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                merges.append((-score, i, normal[left][0], normal[right][0], left, right))
    merges.sort()
    return [(left, right) for *_, left, right in merges]


def build_tokenizer(path: str):
    """The ``tokenizers.Tokenizer`` equivalent to the SentencePiece model at ``path``."""
    try:
        from tokenizers import AddedToken, Tokenizer, decoders, models
    except ImportError:
        raise ConfigError("the Hugging Face export needs the tokenizers package: pip install 'molm-ds[hf]'") from None
    m = _proto(path)
    t = m.trainer_spec
    unk = m.pieces[t.unk_id].piece if t.unk_id >= 0 else None
    if t.model_type == _BPE:
        vocab = {p.piece: i for i, p in enumerate(m.pieces)}
        model = models.BPE(vocab=vocab, merges=_bpe_merges(m), unk_token=unk, fuse_unk=True,
                           byte_fallback=t.byte_fallback)
    elif t.model_type == _UNIGRAM:
        model = models.Unigram([(p.piece, p.score) for p in m.pieces], unk_id=t.unk_id if t.unk_id >= 0 else None,
                               byte_fallback=t.byte_fallback)
    else:
        raise DataError(f"tokenizer {path}: SentencePiece model type {t.model_type} (word/char) has no Hugging Face "
                        "conversion here; use a BPE or unigram model")
    tok = Tokenizer(model)
    norm = _normalizer(m)
    if norm is not None:
        tok.normalizer = norm
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if m.normalizer_spec.add_dummy_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(steps)
    tok.add_special_tokens([AddedToken(p.piece, special=True, normalized=False)
                            for p in m.pieces if p.type in (_CONTROL, _UNKNOWN)])
    # SentencePiece matches user-defined pieces after spaces became "▁", so one holding a space never matches
    user = [AddedToken(p.piece, special=False, normalized=False) for p in m.pieces
            if p.type == _USER_DEFINED and not (m.normalizer_spec.escape_whitespaces and " " in p.piece)]
    if user:
        tok.add_tokens(user)
    return tok


def write_tokenizer(path: str, out_dir: str, *, model_max_length: Optional[int] = None) -> SpecialTokens:
    """Write the tokenizer files of ``path`` into ``out_dir``; returns the special tokens declared.
    ``model_max_length`` None (exports): no limit, since a MoLM has no position embedding and reads any
    length (a limit makes transformers warn of "indexing errors" on every long document); the trained
    context is the config's ``n_positions``, which lm-eval uses for its windows."""
    tok = build_tokenizer(path)
    sp = special_tokens(path)
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    shutil.copyfile(path, os.path.join(out_dir, "tokenizer.model"))
    names = {"bos_token": sp.bos, "eos_token": sp.eos, "pad_token": sp.pad}
    if sp.unk is not None:
        names["unk_token"] = sp.unk
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast", **names,
        **({"model_max_length": model_max_length} if model_max_length is not None else {}),
        "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "split_special_tokens": True, "padding_side": "left",
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
        json.dump(names, f, indent=2)
    return sp
