"""Train a SentencePiece tokenizer on a sample of one or more corpora.

    python -m data_prep.train_tokenizer --input pile:/data/pile/train/00.jsonl.zst \\
        --input cc100:/data/cc100/sw.txt.xz --out /data/tok/molm --vocab-size 32000

Writes ``OUT.model`` and ``OUT.vocab``. Defaults: BPE with byte fallback (every byte is a piece, so
nothing is ever unknown), identity normalisation and no whitespace folding (code keeps its
indentation; decode(encode(text)) == text), digits split. Special tokens, fixed ids:
``<unk>`` 0, ``<s>`` (BOS) 1, ``</s>`` (EOS, appended to every document in the shards) 2,
``<pad>`` 3, then ``--user-symbols`` in the order given, then the 256 byte pieces and merges.

Sampling: the first ``--docs-per-source`` documents of every input are split into lines (lines
longer than ``--max-sentence-length`` bytes are cut, so nothing is dropped silently), and
SentencePiece keeps a random ``--sample-sentences`` of them.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
from typing import Iterator

from data_prep.readers import ReadStats, SourceSpec, expand_inputs, read_source
from molm_ds.log import get_logger

log = get_logger("data_prep.tokenizer")

SPECIALS = dict(unk_id=0, bos_id=1, eos_id=2, pad_id=3)


def sentences(specs: list[SourceSpec], *, docs_per_source: int, max_bytes: int, subsets=None,
              skip_corrupt: bool = False) -> Iterator[str]:
    """Training sentences: lines of the first documents of every source, cut to max_bytes bytes."""
    for spec in specs:
        docs = read_source(spec, subsets=subsets, stats=ReadStats(), skip_corrupt=skip_corrupt)
        for n, doc in enumerate(docs):
            if n >= docs_per_source:
                break
            for line in doc.split("\n"):
                if not line.strip():
                    continue
                b = line.encode("utf-8")
                while len(b) > max_bytes:
                    cut = max_bytes
                    while cut > 0 and (b[cut] & 0xC0) == 0x80:  # do not split a UTF-8 character
                        cut -= 1
                    yield b[:cut].decode("utf-8")
                    b = b[cut:]
                if b:
                    yield b.decode("utf-8")


def train_tokenizer(specs: list[SourceSpec], out_prefix: str, *, vocab_size: int = 32000,
                    sample_sentences: int = 2_000_000, docs_per_source: int = 100_000,
                    character_coverage: float = 0.9995, user_symbols: tuple[str, ...] = (),
                    threads: int | None = None, model_type: str = "bpe", byte_fallback: bool = True,
                    max_sentence_length: int = 8192, subsets=None, skip_corrupt: bool = False,
                    seed: int = 0) -> str:
    """Train and return the path of ``out_prefix.model`` (written atomically)."""
    import sentencepiece as spm

    min_vocab = len(SPECIALS) + len(user_symbols) + (256 if byte_fallback else 0) + 1
    if vocab_size < min_vocab:
        raise ValueError(f"vocab_size {vocab_size} is too small: specials, user symbols and "
                         f"{'256 byte pieces' if byte_fallback else 'characters'} need at least {min_vocab}")
    os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
    tmp_prefix = out_prefix + ".tmp"
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(specs, docs_per_source=docs_per_source, max_bytes=max_sentence_length,
                                        subsets=subsets, skip_corrupt=skip_corrupt),
            model_prefix=tmp_prefix, model_type=model_type, vocab_size=vocab_size,
            character_coverage=character_coverage, byte_fallback=byte_fallback,
            input_sentence_size=sample_sentences, shuffle_input_sentence=True,
            max_sentence_length=max_sentence_length, num_threads=threads or os.cpu_count() or 1,
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
            split_digits=True, allow_whitespace_only_pieces=True, user_defined_symbols=list(user_symbols),
            pad_piece="<pad>", unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>", **SPECIALS,
            minloglevel=2,
        )
    except RuntimeError as e:
        m = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", str(e))
        if not m:
            raise
        raise ValueError(f"vocab_size {vocab_size} is smaller than the {m.group(2)} pieces the sample needs (its "
                         f"characters at character_coverage={character_coverage}, plus specials): raise "
                         f"--vocab-size to at least {m.group(2)} or lower --character-coverage") from None
    os.replace(tmp_prefix + ".vocab", out_prefix + ".vocab")
    os.replace(tmp_prefix + ".model", out_prefix + ".model")
    return out_prefix + ".model"


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m data_prep.train_tokenizer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", action="append", default=[], metavar="KIND:PATH",
                   help="a corpus file (glob allowed); KIND: pile, cc100, jsonl, text, lines, hf. Repeat for more.")
    p.add_argument("--out", required=True, help="output prefix: writes OUT.model and OUT.vocab")
    p.add_argument("--existing", help="use this existing .model instead of training (it is copied to OUT.model)")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    p.add_argument("--no-byte-fallback", action="store_true", help="unknown characters become <unk>")
    p.add_argument("--sample-sentences", type=int, default=2_000_000, help="SentencePiece input_sentence_size")
    p.add_argument("--docs-per-source", type=int, default=100_000, help="documents read from each input")
    p.add_argument("--character-coverage", type=float, default=0.9995)
    p.add_argument("--user-symbols", default="", help="comma-separated extra symbols that are never split")
    p.add_argument("--max-sentence-length", type=int, default=8192, help="bytes; longer lines are cut")
    p.add_argument("--pile-subset", action="append", help="keep only these meta.pile_set_name values")
    p.add_argument("--skip-corrupt", action="store_true", help="skip corrupt lines instead of stopping")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if not a.existing and not a.input:
        p.error("give --input KIND:PATH (one or more) to train, or --existing MODEL")
    if a.existing:
        shutil.copyfile(a.existing, a.out + ".model.tmp")
        os.replace(a.out + ".model.tmp", a.out + ".model")
        path = a.out + ".model"
    else:
        try:
            path = train_tokenizer(
                expand_inputs(a.input), a.out, vocab_size=a.vocab_size, sample_sentences=a.sample_sentences,
                docs_per_source=a.docs_per_source, character_coverage=a.character_coverage,
                user_symbols=tuple(s for s in a.user_symbols.split(",") if s), threads=a.threads,
                model_type=a.model_type, byte_fallback=not a.no_byte_fallback,
                max_sentence_length=a.max_sentence_length,
                subsets=set(a.pile_subset) if a.pile_subset else None, skip_corrupt=a.skip_corrupt, seed=a.seed)
        except ValueError as e:
            p.exit(2, f"error: {e}\n")
    print(f"tokenizer: {path} (sha256 {file_sha256(path)[:16]}...)")


if __name__ == "__main__":
    main()
