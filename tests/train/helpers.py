"""Shared by tests/train and tests/launch: a synthetic token shard and tiny job files."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[2]
TINY_JOB = REPO / "configs" / "tiny_test.yaml"


def synthetic_tokenizer_sha256(vocab: int) -> str:
    """Stands in for the SHA-256 of a tokenizer file: one per vocabulary size, so shards written here with
    the same ``vocab`` count as one tokenizer and can be mixed."""
    return hashlib.sha256(f"synthetic tokenizer, vocab {vocab}".encode()).hexdigest()


def write_shard(directory: str | os.PathLike, *, n_docs: int = 120, doc_len: int = 300, vocab: int = 512,
                seed: int = 0) -> str:
    """A learnable token stream (each doc walks t -> (5t + 3) mod (vocab - 8) from a random start; EOS=2).
    Returns the shard directory, with a complete manifest as build_shards writes it (shard sizes, dtype,
    a tokenizer hash for ``vocab``; the loader refuses a directory without one)."""
    from data_prep.indexed_writer import IndexedShardWriter

    os.makedirs(directory, exist_ok=True)
    prefix = os.path.join(directory, "part-00000")
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n_docs):
        t = int(rng.integers(8, vocab))
        doc = []
        for _ in range(doc_len - 1):
            doc.append(t)
            t = 8 + (5 * t + 3) % (vocab - 8)
        docs.append(np.array(doc + [2], dtype=np.uint16))
    w = IndexedShardWriter(prefix, np.uint16)
    w.add_documents(np.concatenate(docs), np.array([len(d) for d in docs]))
    n_docs_written, n_tokens = w.finish()
    shard = {"prefix": "part-00000", "docs": n_docs_written, "tokens": n_tokens,
             "bin_bytes": os.path.getsize(prefix + ".bin"), "idx_bytes": os.path.getsize(prefix + ".idx")}
    manifest = {"format": 2, "dtype": "uint16", "documents": n_docs_written, "tokens": n_tokens,
                "tokenizer": {"vocab_size": vocab, "eos_id": 2, "bos_id": 1, "pad_id": 3, "unk_id": 0,
                              "model_path": None, "sha256": synthetic_tokenizer_sha256(vocab)},
                "shards": [shard]}
    Path(directory, "manifest.json").write_text(json.dumps(manifest))
    return str(directory)


def tiny_job_overrides(shard: str, run_dir: str | os.PathLike, **extra) -> list[str]:
    """--set overrides that point the tiny test job at a shard and a run directory."""
    out = [f"data.sources=[{{path: '{shard}'}}]", f"run_dir={run_dir}"]
    out += [f"{k}={v}" for k, v in extra.items()]
    return out


def read_metrics(run_dir: str | os.PathLike) -> dict[int, dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {r["step"]: r for r in rows}


def write_ds_config(path: str | os.PathLike, **cfg) -> str:
    Path(path).write_text(json.dumps(cfg))
    return str(path)


def write_yaml(path: str | os.PathLike, data: dict) -> str:
    Path(path).write_text(yaml.safe_dump(data))
    return str(path)
