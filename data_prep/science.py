"""A larger two-domain corpus for the science experiments, built from what this machine has installed.

    python -m data_prep.science --out data/science [--prose-chars 4500000] [--code-chars 4500000]

Domains (both deterministic for a given set of installed files):
  prose  English manual pages (/usr/share/man/man1..man8, gzip'd roff), rendered to plain text here by
         stripping the roff markup (no groff: a page per millisecond instead of per 50 ms, and no
         dependence on the terminal width); `.so` redirections, duplicates and pages under 400
         characters are dropped. Pages are taken in the order of the SHA-1 of their file names (a
         spread over commands, libraries and file formats, not the first letters of the alphabet)
         until --prose-chars.
  code   the Python standard library source (<stdlib>/**/*.py, test suites included), in the same
         hashed order, until --code-chars.

The tokenizer (SentencePiece BPE with byte fallback, vocab --vocab-size, 512 = the tiny preset) is
trained on both domains with data_prep.train_tokenizer, the shards are written by
data_prep.build_shards (the project's format), so molm_ds.data reads DIR/shards/{prose,code}.

The manifest records how many tokens the trainer's default position split (molm_ds.data.mixture) holds
out per domain at val_fraction 0.1 and seq_len 64; the experiments harness splits this corpus by document
instead (train / validation / test, docs/science.md) and reports its window counts with every result.

    DIR/pile/train/00.jsonl.zst   both domains, meta.pile_set_name man_pages | python_stdlib_tree
    DIR/tokenizer.model, DIR/shards/prose, DIR/shards/code, DIR/manifest.json
Idempotent: a rerun with the same options prints "up to date".

The corpus depends on the machine (its man pages and the running Python's standard library), so the
manifest records two content hashes and the build prints them: ``documents_sha256`` (the documents' text,
before tokenising) and ``corpus_sha256`` (what a run reads: tokenizer.model and every shard file, see
``corpus_sha256``). The experiments harness records the latter with every result and refuses a corpus
whose hash differs from the committed results' unless told.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import os
import re
import sys
import sysconfig
import time

from data_prep import domains
from molm_ds.errors import DataError

PROSE, CODE = "man_pages", "python_stdlib_tree"
MAN_ROOT = "/usr/share/man"
VAL_FRACTION = 0.1
SEQ_LEN = 64
MIN_DOC_CHARS = 400
# Pages per command family (the name up to the first '-', '_', '.' or digit): man1 on this machine holds
# thousands of near-identical `gcloud-*` pages, which would otherwise be most of the prose.
MAX_PER_FAMILY = 8

# Roff escapes, most specific first. \f font changes, \s size changes, \* strings and \( / \[ special
# characters either become their plain-text reading or disappear.
_SPECIAL = {"em": "--", "en": "-", "bu": "*", "aq": "'", "dq": '"', "lq": '"', "rq": '"', "oq": "'",
            "cq": "'", "hy": "-", "mi": "-", "pl": "+", "eq": "=", "ti": "~", "ha": "^", "co": "(c)",
            "rg": "(R)", "tm": "(TM)", "<=": "<=", ">=": ">=", "->": "->", "<-": "<-", "ga": "`",
            "sl": "/", "rs": "\\", "lB": "[", "rB": "]", "lC": "{", "rC": "}", "ba": "|", "or": "|",
            "at": "@", "sh": "#", "Do": "$", "ct": "c", "de": "deg", "mu": "x", "di": "/"}
_ESCAPES = [
    (re.compile(r"\\f(\(..|\[[^\]]*\]|.)"), ""),
    (re.compile(r"\\s[+-]?(\(\d\d|\[\d+\]|\d)"), ""),
    (re.compile(r"\\\((..)"), lambda m: _SPECIAL.get(m.group(1), "")),
    (re.compile(r"\\\[([^\]]*)\]"), lambda m: _SPECIAL.get(m.group(1), "")),
    (re.compile(r"\\\*(\(..|\[[^\]]*\]|.)"), ""),
    (re.compile(r"\\[nkgw](\(..|\[[^\]]*\]|.)"), ""),
    (re.compile(r"\\[hvlLDxXoNbYZ]'[^']*'"), " "),
    (re.compile(r"\\[-]"), "-"),
    (re.compile(r"\\e"), "\\\\"),
    (re.compile(r"\\[&|^%:{}cdrtpu)]"), ""),
    (re.compile(r"\\ "), " "),
    (re.compile(r"\\(.)"), r"\1"),
]
# Requests whose arguments are text (section headings, fonts, tagged paragraphs, mdoc macros).
_TEXT_MACROS = {"SH", "SS", "B", "I", "SM", "SB", "BR", "RB", "IR", "RI", "BI", "IB", "IP", "UR",
                "MT", "OP", "Nm", "Nd", "Sh", "Ss", "Fl", "Ar", "Op", "Xr", "Pa", "Ev", "Cm", "Dv", "Em",
                "Sy", "Li", "Ql", "Dq", "Sq", "Pq", "It", "Fn", "Fa", "Ft", "Va", "Er", "Tn", "Ic", "Ux"}
_ALTERNATING = {"BR", "RB", "IR", "RI", "BI", "IB"}  # fonts alternate word by word, no space between


def _unescape(s: str) -> str:
    for pat, rep in _ESCAPES:
        s = pat.sub(rep, s)
    return s


def _macro_args(rest: str) -> list[str]:
    return [a.strip('"') for a in re.findall(r'"[^"]*"|\S+', rest)]


def roff_to_text(src: str) -> str | None:
    """Plain text of a man page's roff source, or None for a `.so` redirection."""
    out: list[str] = []
    skip_until = None  # inside .de/.ig definitions (macro packages preambles of pod2man pages)
    for line in src.split("\n"):
        if skip_until is not None:
            if line.startswith(skip_until):
                skip_until = None
            continue
        if line.startswith((".\\\"", "'\\\"", "\\\"")):
            continue
        if line[:1] in (".", "'"):
            m = re.match(r"[.']\s*(\S*)\s*(.*)", line)
            name, rest = (m.group(1), m.group(2)) if m else ("", "")
            if name == "so":
                return None
            if name in ("de", "de1", "am", "ig"):
                skip_until = ".."
                continue
            if name in _TEXT_MACROS:
                args = _macro_args(rest)[:1] if name == "IP" else _macro_args(rest)  # .IP tag indent
                text = ("" if name in _ALTERNATING else " ").join(args)
                if name in ("SH", "SS", "Sh", "Ss"):
                    out.append("")
                out.append(_unescape(text))
            elif name in ("PP", "LP", "P", "sp", "Pp", "br", "TP"):
                out.append("")
            continue  # other requests (.TH, .if, .nr, .ds, .TS, ...) carry no prose
        out.append(_unescape(line))
    text = re.sub(r"[ \t]+", " ", "\n".join(out))
    text = re.sub(r"\n{3,}", "\n\n", text).strip()
    return text


def _hashed(paths: list[str], root: str) -> list[str]:
    return sorted(paths, key=lambda p: hashlib.sha1(os.path.relpath(p, root).encode()).hexdigest())


def _take(paths, read, max_chars: int) -> tuple[list[str], int]:
    docs, seen, total = [], set(), 0
    for p in paths:
        text = read(p)
        if text is None or len(text) < MIN_DOC_CHARS:
            continue
        h = hashlib.sha1(text.encode()).digest()
        if h in seen:
            continue
        seen.add(h)
        docs.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return docs, total


def _read_man(path: str) -> str | None:
    try:
        with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
            return roff_to_text(f.read())
    except (OSError, EOFError):
        return None


def _read_py(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (UnicodeDecodeError, OSError):
        return None


def _family(path: str) -> str:
    return re.split(r"[-_.\d]", os.path.basename(path), maxsplit=1)[0].lower()


def prose_documents(max_chars: int, root: str = MAN_ROOT) -> list[str]:
    paths = [p for d in range(1, 9) for p in glob.glob(os.path.join(root, f"man{d}", "*.gz"))
             if os.path.isfile(p) and not os.path.islink(p)]
    kept, per_family = [], {}
    for p in _hashed(paths, root):
        f = _family(p)
        per_family[f] = per_family.get(f, 0) + 1
        if per_family[f] <= MAX_PER_FAMILY:
            kept.append(p)
    return _take(kept, _read_man, max_chars)[0]


def code_documents(max_chars: int) -> list[str]:
    lib = sysconfig.get_paths()["stdlib"]
    paths = [p for p in glob.glob(os.path.join(lib, "**", "*.py"), recursive=True)
             if "site-packages" not in p and "dist-packages" not in p and os.path.isfile(p)]
    return _take(_hashed(paths, lib), _read_py, max_chars)[0]


def corpus_sha256(out: str) -> str:
    """sha256 of what a run reads: the tokenizer (its model without the options that name the build's path
    and CPU count, ``spm_model.MACHINE_FIELDS``) and every shards/<domain>/ .bin and .idx file, in name
    order, each preceded by its path relative to ``out``. Equal hashes mean the same tokens whatever the
    directory or the machine; the shards' manifest.json is left out (it records absolute paths, the build
    command and the input's mtime)."""
    from data_prep import spm_model

    h = hashlib.sha256()
    files = [os.path.join(out, "tokenizer.model")]
    for d in sorted(glob.glob(os.path.join(out, "shards", "*"))):
        files += sorted(p for p in glob.glob(os.path.join(d, "*")) if p.endswith((".bin", ".idx")))
    for p in files:
        if not os.path.isfile(p):
            raise DataError(f"{out}: no {os.path.relpath(p, out)}; build the corpus with python -m data_prep.science "
                            f"--out {out}")
        h.update(os.path.relpath(p, out).encode() + b"\0")
        with open(p, "rb") as f:
            if p.endswith(".model"):
                h.update(spm_model.canonical_bytes(f.read()))
                continue
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def documents_sha256(out: str) -> str:
    """sha256 of the documents' text as sampled (the uncompressed samples file)."""
    import zstandard

    with open(domains.pile_path(out), "rb") as f:
        return hashlib.sha256(zstandard.ZstdDecompressor().decompress(f.read(), max_output_size=1 << 31)).hexdigest()


def val_tokens(shard_dir: str, val_fraction: float, seq_len: int) -> int:
    """Tokens in the trainer's validation windows of one domain (predicted tokens: seq_len per window)."""
    from molm_ds.data import DataSource, MixtureLoader

    val = MixtureLoader([DataSource(shard_dir, 1.0)], seq_len=seq_len, micro_batch_size=1, seed=0,
                        split="val", val_fraction=val_fraction)
    return sum(len(w) for w in val.windows) * seq_len


def build_science(out: str, *, prose_chars: int, code_chars: int, vocab_size: int = 512, workers: int = 2,
                  say=print) -> dict:
    options = {"prose_chars": prose_chars, "code_chars": code_chars, "vocab_size": vocab_size,
               "python": sys.version.split()[0], "val_fraction": VAL_FRACTION}
    man = domains.up_to_date(out, options, "science corpus", say)
    if man is not None:
        return man
    pile = domains.pile_path(out)
    os.makedirs(os.path.dirname(pile), exist_ok=True)
    if not os.path.exists(pile):
        prose, code = prose_documents(prose_chars), code_documents(code_chars)
        if not prose or not code:
            raise DataError(f"found {len(prose)} man pages under {MAN_ROOT} and {len(code)} stdlib modules: "
                            "this machine lacks one of the domains")
        domains.write_pile(pile, prose, code, prose_set=PROSE, code_set=CODE)
        say(f"samples: {pile} ({len(prose)} man pages, {sum(map(len, prose)):,} chars; "
            f"{len(code)} stdlib modules, {sum(map(len, code)):,} chars)")

    def held_out(shard_dir: str) -> tuple[dict, str]:
        vt = val_tokens(shard_dir, VAL_FRACTION, SEQ_LEN)
        return {f"val_tokens_seq{SEQ_LEN}": vt}, f", {vt:,} held out at val_fraction {VAL_FRACTION}"

    man = domains.tokenize_domains(
        out, options=options, subsets={"prose": PROSE, "code": CODE}, vocab_size=vocab_size, workers=workers,
        samples={"pile": [os.path.relpath(pile, out)]}, say=say, sample_sentences=400_000, describe=held_out)
    man["content"] = {"documents_sha256": documents_sha256(out), "corpus_sha256": corpus_sha256(out)}
    from data_prep.indexed_writer import atomic_write_bytes

    atomic_write_bytes(os.path.join(out, "manifest.json"), (json.dumps(man, indent=1) + "\n").encode())
    say(f"content: documents sha256 {man['content']['documents_sha256']}, corpus sha256 "
        f"{man['content']['corpus_sha256']}")
    return man


def main(argv=None) -> int:
    from data_prep.options import positive_int
    from molm_ds import cli

    p = cli.ArgumentParser(prog="python -m data_prep.science", description=__doc__)
    p.add_argument("--out", required=True, help="output directory (e.g. data/science)")
    p.add_argument("--prose-chars", type=positive_int, default=4_500_000, help="characters of man-page text")
    p.add_argument("--code-chars", type=positive_int, default=4_500_000, help="characters of stdlib source")
    p.add_argument("--vocab-size", type=positive_int, default=512, help="512 for the tiny preset")
    p.add_argument("--workers", type=positive_int, default=2, help="tokenising processes")
    a = p.parse_args(argv)
    if os.path.exists(a.out) and not os.path.isdir(a.out):
        raise DataError(f"--out {a.out} is a file, not a directory")
    t0 = time.perf_counter()
    build_science(a.out, prose_chars=a.prose_chars, code_chars=a.code_chars, vocab_size=a.vocab_size,
                  workers=a.workers)
    print(f"done in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    from molm_ds import cli

    cli.run(main)
