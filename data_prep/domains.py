"""A two-domain corpus directory (prose + code), as the embedded and the science corpora lay it out.

    OUT/manifest.json            options, tokenizer record, per-domain counts, samples
    OUT/pile/train/00.jsonl.zst  both domains in Pile format, told apart by ``pile_set_name``
    OUT/tokenizer.model          SentencePiece, trained on both domains
    OUT/shards/{prose,code}/     the trainer's shards (ordinary ``DataSource`` paths)

The builders (``data_prep.embedded``, ``data_prep.science``) choose the documents; this module owns the
layout: the up-to-date check, the Pile sample, the tokenizer, the shards and the manifest.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Optional

import zstandard

from data_prep.build_shards import build_shards
from data_prep.indexed_writer import atomic_write_bytes
from data_prep.readers import SourceSpec
from data_prep.spm_model import tokenizer_record
from data_prep.train_tokenizer import train_tokenizer
from molm_ds.errors import DataError

__all__ = ["pile_path", "up_to_date", "write_pile", "tokenize_domains"]


def pile_path(out: str) -> str:
    return os.path.join(out, "pile", "train", "00.jsonl.zst")


def up_to_date(out: str, options: dict, what: str, say=print) -> Optional[dict]:
    """The manifest of a corpus already built in ``out`` with ``options``; None if there is none yet;
    DataError if ``out`` holds one built with other options (nothing is overwritten)."""
    man_path = os.path.join(out, "manifest.json")
    if not os.path.exists(man_path):
        return None
    with open(man_path) as f:
        man = json.load(f)
    if man.get("options") == options:
        say(f"{what} in {out} is up to date ({man_path})")
        return man
    raise DataError(f"{out} holds a corpus ({what}) built with {man.get('options')}, not {options}; "
                    "use another --out or delete it")


def write_pile(path: str, prose: list[str], code: list[str], *, prose_set: str, code_set: str) -> None:
    lines = [json.dumps({"text": t, "meta": {"pile_set_name": prose_set}}) for t in prose]
    lines += [json.dumps({"text": t, "meta": {"pile_set_name": code_set}}) for t in code]
    atomic_write_bytes(path, zstandard.ZstdCompressor(level=3).compress(("\n".join(lines) + "\n").encode()))


def tokenize_domains(out: str, *, options: dict, subsets: dict[str, str], vocab_size: int, workers: int,
                     samples: dict, say=print, sample_sentences: Optional[int] = None,
                     describe: Optional[Callable[[str], tuple[dict, str]]] = None) -> dict:
    """Train the tokenizer on ``pile_path(out)`` (unless present), write one shard directory per domain
    (``subsets``: domain -> pile_set_name), then the manifest (last: its presence means done). ``describe``
    (shard dir -> extra manifest fields, text for the progress line) adds per-domain facts."""
    pile = pile_path(out)
    tok = os.path.join(out, "tokenizer.model")
    if not os.path.exists(tok):
        kw = {} if sample_sentences is None else {"sample_sentences": sample_sentences}
        train_tokenizer([SourceSpec("pile", pile)], os.path.join(out, "tokenizer"), vocab_size=vocab_size,
                        threads=workers, **kw)
        say(f"tokenizer: {tok} (vocab {vocab_size})")
    domains = {}
    for domain, subset in subsets.items():
        shard_dir = os.path.join(out, "shards", domain)
        m = build_shards([SourceSpec("pile", pile)], tok, shard_dir, workers=workers, subsets={subset},
                         progress=False)
        extra, note = describe(shard_dir) if describe is not None else ({}, "")
        domains[domain] = {"shards": os.path.join("shards", domain), "pile_set_name": subset,
                           "documents": m["documents"], "tokens": m["tokens"], **extra}
        say(f"shards: {shard_dir} ({m['documents']} documents, {m['tokens']:,} tokens{note})")
    rec = tokenizer_record(tok)
    rec["model_path"] = "tokenizer.model"  # relative to this directory
    man = {"options": options, "tokenizer": rec, "domains": domains, "samples": samples}
    man_path = os.path.join(out, "manifest.json")
    atomic_write_bytes(man_path, (json.dumps(man, indent=1) + "\n").encode())
    say(f"manifest: {man_path}")
    return man
