"""The embedded default corpus: built from text that ships with every Python installation.

    python -m data_prep.embedded --out data/embedded [--vocab-size 512]

Two domains: ``prose`` (English: the help topics in ``pydoc_data.topics``) and ``code`` (Python
source of the standard library's top-level modules, first ``--code-bytes`` bytes by file name).
It writes, in the published formats, so the real-corpus recipes run unchanged on them:

    DIR/pile/train/00.jsonl.zst   Pile format, both domains, meta.pile_set_name "pydoc_topics" / "python_stdlib"
    DIR/cc100/en.txt.xz           CC-100 format (prose; documents separated by a blank line)
    DIR/tokenizer.model           SentencePiece BPE + byte fallback trained on both domains
    DIR/shards/prose, DIR/shards/code   shard directories (DataSource paths for molm_ds.data)
    DIR/manifest.json             tokenizer ids, vocab size, per-domain documents and tokens

Idempotent: every step is skipped when its output exists (and the manifest matches the options).
"""

from __future__ import annotations

import lzma
import os
import sys
import sysconfig
import time

from data_prep import domains
from data_prep.indexed_writer import atomic_write_bytes
from molm_ds.errors import DataError

PROSE, CODE = "pydoc_topics", "python_stdlib"


def prose_documents() -> list[str]:
    """One document per pydoc help topic, sorted by topic name."""
    import pydoc_data.topics

    return [pydoc_data.topics.topics[k].strip("\n") for k in sorted(pydoc_data.topics.topics)]


def code_documents(max_bytes: int) -> list[str]:
    """Top-level standard-library modules (``Lib/*.py``), sorted by name, up to max_bytes in total."""
    lib = sysconfig.get_paths()["stdlib"]
    docs, total = [], 0
    for name in sorted(os.listdir(lib)):
        path = os.path.join(lib, name)
        if not name.endswith(".py") or not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (UnicodeDecodeError, OSError):
            continue
        if total + len(text) > max_bytes and docs:
            break
        docs.append(text)
        total += len(text)
    return docs


def _write_cc100(path: str, prose: list[str]) -> None:
    # A CC-100 document has no blank lines inside: drop them, keep the paragraphs' lines.
    docs = ["\n".join(l for l in d.split("\n") if l.strip()) for d in prose]
    atomic_write_bytes(path, lzma.compress(("\n\n".join(docs) + "\n\n").encode(), preset=3))


def build_embedded(out: str, *, vocab_size: int = 512, code_bytes: int = 1_500_000, workers: int = 2,
                   say=print) -> dict:
    """Build (or finish) the embedded corpus in ``out``; returns the top-level manifest."""
    options = {"vocab_size": vocab_size, "code_bytes": code_bytes, "python": sys.version.split()[0]}
    man = domains.up_to_date(out, options, "embedded corpus", say)
    if man is not None:
        return man
    pile = domains.pile_path(out)
    cc100 = os.path.join(out, "cc100", "en.txt.xz")
    os.makedirs(os.path.dirname(pile), exist_ok=True)
    os.makedirs(os.path.dirname(cc100), exist_ok=True)
    if not (os.path.exists(pile) and os.path.exists(cc100)):
        prose, code = prose_documents(), code_documents(code_bytes)
        domains.write_pile(pile, prose, code, prose_set=PROSE, code_set=CODE)
        _write_cc100(cc100, prose)
        say(f"samples: {pile} ({len(prose)} prose + {len(code)} code documents), {cc100}")
    return domains.tokenize_domains(
        out, options=options, subsets={"prose": PROSE, "code": CODE}, vocab_size=vocab_size, workers=workers,
        samples={"pile": [os.path.relpath(pile, out)], "cc100": [os.path.relpath(cc100, out)]}, say=say)


def main(argv=None) -> int:
    from molm_ds import cli
    from data_prep.options import positive_int

    p = cli.ArgumentParser(prog="python -m data_prep.embedded", description=__doc__)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--vocab-size", type=positive_int, default=512, help="512 for the tiny preset, 4096 for small")
    p.add_argument("--code-bytes", type=positive_int, default=1_500_000, help="characters of stdlib source to include")
    p.add_argument("--workers", type=positive_int, default=2, help="tokenising processes")
    a = p.parse_args(argv)
    if os.path.exists(a.out) and not os.path.isdir(a.out):
        raise DataError(f"--out {a.out} is a file, not a directory")
    t0 = time.perf_counter()
    build_embedded(a.out, vocab_size=a.vocab_size, code_bytes=a.code_bytes, workers=a.workers)
    print(f"done in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    from molm_ds import cli

    cli.run(main)
