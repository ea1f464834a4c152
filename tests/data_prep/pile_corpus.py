"""Small Pile-format corpora for the build_shards tests (a helper module, not a test module)."""

import json

import zstandard

LONG = "A sentence that repeats to exceed the sentence limit. " * 400  # > SentencePiece's 4192 bytes


def docs_for(i):
    return [f"Document {i}.{j}: ünïcödé 你好 and code `x = {j}`\r\nsecond line" for j in range(7)] + ["", LONG]


def write_pile(path, docs, extra=b""):
    lines = b"".join(json.dumps({"text": t, "meta": {"pile_set_name": "Pile-CC"}}).encode() + b"\n" for t in docs)
    path.write_bytes(zstandard.ZstdCompressor().compress(lines + extra))
