"""Perplexity and bits per byte of a model on held-out documents, every token scored exactly once.

    docs = read_documents("jsonl:held_out.jsonl", tokenizer)        # or a shard directory
    seqs = sequences(docs, eos_id=tok.eos_id, context="document")
    wins = [w for s in seqs for w in rolling_windows(s, seq_len=64, stride=64)]
    result = evaluate(model, window_batches(wins[rank::world], batch_size=8, pad_id=tok.pad_id))

Scoring (``context``):
- ``document`` (default): each document alone, after an EOS (molm-ds shards put EOS between documents
  and no BOS, so EOS is what a document starts from); its tokens are the targets (its closing EOS too
  with ``score_eos``). With ``stride == seq_len`` this is exactly lm-evaluation-harness's
  ``loglikelihood_rolling`` with the EOS as prefix token and ``max_length = seq_len``.
- ``stream``: the documents back to back with EOS after each, as the trainer reads a source, after
  one EOS; every token is a target (EOSes included).

Windows (``rolling_windows``): the scored sequence is ``s = [EOS] + targets``; the first window is
``s[0:L]`` (targets 0..L-1), then every ``stride`` further targets end a window ``s[q-L:q]`` in which
only the new targets count (labels -100 for the others), so each target sees at least ``L - stride``
tokens of context; ``stride == L`` gives disjoint windows that overlap by one token, as the trainer's.
Bits per byte: total nats / (ln 2 x UTF-8 bytes of the documents' text).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from molm_ds.errors import ConfigError, DataError

__all__ = ["Documents", "is_text_source", "read_documents", "sequences", "rolling_windows", "rolling_windows_reference",
           "window_batches", "bits_per_byte", "CONTEXTS"]

CONTEXTS = ("document", "stream")


@dataclass
class Documents:
    """The token ids (no EOS) of one evaluation source's documents, and their text's UTF-8 size."""

    name: str
    ids: list[list[int]]
    n_bytes: Optional[int]  # None when the text is unknown (shards without a tokenizer)


def is_text_source(spec: str) -> bool:
    """Whether a command-line source is raw text (KIND:PATH) rather than a shard directory."""
    from data_prep.readers import KINDS

    kind, sep, _ = spec.partition(":")
    return bool(sep) and kind in KINDS


def read_documents(spec: str, tokenizer, *, max_docs: Optional[int] = None, text_key: str = "text",
                   split: Optional[tuple] = None) -> Documents:
    """A source given on the command line: ``KIND:PATH`` (raw text read by ``data_prep.readers``: pile,
    cc100, jsonl, text, lines, hf; PATH may be a glob), tokenised with ``tokenizer``; or a shard directory /
    Megatron prefix (documents from the index, trailing EOS dropped; text decoded for the byte count)."""
    if is_text_source(spec):
        from data_prep.readers import expand_inputs, read_source

        ids, n_bytes = [], 0
        for s in expand_inputs([spec]):
            for text in read_source(s, text_key=text_key):
                if max_docs is not None and len(ids) >= max_docs:
                    break
                if not text:
                    continue
                ids.append(tokenizer.encode(text))
                n_bytes += len(text.encode("utf-8"))
        if not ids:
            raise DataError(f"{spec}: no non-empty document to evaluate")
        return Documents(spec, ids, n_bytes)
    return _shard_documents(spec, tokenizer, max_docs, split)


def _split_keep(path: str, split: tuple) -> "np.ndarray":
    """Per sequence of the source (all shards in order): True when its document is in split[0]."""
    from molm_ds.data.mixture import SPLITS, document_labels
    from molm_ds.data.packing import TokenStream

    name, val_fraction, test_fraction = split
    st = TokenStream(path)
    starts = st.document_starts()
    label = document_labels(starts, st.num_tokens, val_fraction, test_fraction)
    seq_starts = np.concatenate([np.concatenate([[0], np.cumsum(s.sequence_lengths, dtype=np.int64)[:-1]]) + int(off)
                                 for off, s in zip(st.offsets[:-1], st.shards) if len(s)] or [np.zeros(0, np.int64)])
    doc_of = np.searchsorted(starts, seq_starts, side="right") - 1
    return label[doc_of] == SPLITS.index(name)


def _shard_documents(path: str, tokenizer, max_docs: Optional[int], split: Optional[tuple] = None) -> Documents:
    from molm_ds.data.indexed import IndexedShard
    from molm_ds.data.manifest import check_shard_files, source_shards, tokenizer_info

    entries = source_shards(path)  # DataError for a path that is no source, unfinished builds, ...
    check_shard_files(entries)
    eos = tokenizer.eos_id if tokenizer is not None else None
    try:
        info = tokenizer_info(path)
    except DataError:
        info = None  # plain Megatron shards: no manifest to compare with
    if info is not None:
        if tokenizer is not None and tokenizer.model_path and info.sha256:
            from data_prep.identity import file_sha256

            if file_sha256(tokenizer.model_path) != info.sha256:
                theirs = info.model_path or f"sha256 {info.sha256[:12]}..."
                raise DataError(f"{path} was tokenised with another tokenizer ({theirs}) than the one evaluating it "
                                f"({tokenizer.model_path}); pass the shards' tokenizer with --tokenizer, or rebuild the "
                                "shards with this one")
        eos = info.eos_id if eos is None else eos
    if eos is None:
        raise DataError(f"{path}: no manifest names its EOS id and no tokenizer was given; pass --tokenizer M.model")
    ids: list[list[int]] = []
    keep = _split_keep(path, split) if split is not None else None
    seq = -1
    for e in entries:
        shard = IndexedShard(e.prefix)
        for i in range(len(shard)):
            seq += 1
            if keep is not None and not keep[seq]:
                continue
            if max_docs is not None and len(ids) >= max_docs:
                break
            doc = np.asarray(shard[i]).astype(np.int64).tolist()
            if doc and doc[-1] == eos:
                doc = doc[:-1]
            if doc:
                ids.append(doc)
    if not ids:
        raise DataError(f"{path}: no document to evaluate" + (f" in its {split[0]} split" if split else ""))
    n_bytes = None
    if tokenizer is not None:
        n_bytes = sum(len(tokenizer.decode(d).encode("utf-8")) for d in ids)
    return Documents(path, ids, n_bytes)


def sequences(docs: Documents, *, eos_id: int, context: str = "document", score_eos: bool = False) -> list[list[int]]:
    """The target sequences to score (each is scored after one EOS): one per document, or one stream."""
    if context == "document":
        return [d + [eos_id] if score_eos else list(d) for d in docs.ids]
    if context == "stream":
        stream: list[int] = []
        for d in docs.ids:
            stream.extend(d)
            stream.append(eos_id)
        return [stream]
    raise ConfigError(f"context {context!r}: choose one of {', '.join(CONTEXTS)}")


def rolling_windows(targets: Sequence[int], *, prefix: int, seq_len: int, stride: int) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) windows of at most ``seq_len`` tokens that score every target once (see the
    module docstring); labels -100 where a target was scored by an earlier window."""
    if not 1 <= stride <= seq_len:
        raise ConfigError(f"stride {stride} must be in [1, seq_len={seq_len}]")
    s = [prefix] + list(targets)
    n = len(targets)
    if n == 0:
        return []
    first = min(seq_len, n)
    out = [(s[:first], s[1:first + 1])]
    done = first
    while done < n:
        q = min(done + stride, n)
        start = max(0, q - seq_len)
        labels = s[start + 1:q + 1]
        keep_from = done - start  # labels before this index were scored already
        out.append((s[start:q], [-100] * keep_from + labels[keep_from:]))
        done = q
    return out


def rolling_windows_reference(targets: Sequence[int], *, prefix: int, seq_len: int, stride: int) -> dict[int, list[int]]:
    """Slow path: {target index: the context it is predicted from}, target by target, with the same
    window boundaries as ``rolling_windows``."""
    s = [prefix] + list(targets)
    out = {}
    for i in range(len(targets)):
        if i < seq_len:
            start = 0
        else:
            chunk_end = seq_len + ((i - seq_len) // stride + 1) * stride  # targets < chunk_end share a window
            start = max(0, min(chunk_end, len(targets)) - seq_len)
        out[i] = s[start:i + 1]
    return out


def window_batches(windows: Sequence[tuple[list[int], list[int]]], *, batch_size: int, pad_id: int) -> Iterator[dict]:
    """Batches ``{"input_ids", "labels"}`` [B, T] for ``molm_ds.train.evaluate.evaluate``; shorter windows
    are right-padded (``pad_id`` inputs, -100 labels: a causal model's real positions never see them)."""
    for i in range(0, len(windows), batch_size):
        chunk = windows[i:i + batch_size]
        T = max(len(x) for x, _ in chunk)
        ids = torch.full((len(chunk), T), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), T), -100, dtype=torch.long)
        for r, (x, y) in enumerate(chunk):
            ids[r, :len(x)] = torch.tensor(x)
            labels[r, :len(y)] = torch.tensor(y)
        yield {"input_ids": ids, "labels": labels}


def bits_per_byte(loss_nats: float, tokens: int, n_bytes: Optional[int]) -> Optional[float]:
    if not n_bytes:
        return None
    return loss_nats * tokens / (math.log(2) * n_bytes)
