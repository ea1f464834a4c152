"""Train a SentencePiece tokenizer on a sample of one or more corpora, or adopt an existing one.

    python -m data_prep.train_tokenizer --input pile:/data/pile/train/00.jsonl.zst \\
        --input cc100:/data/cc100/sw.txt.xz --out /data/tok/molm --vocab-size 32000
    python -m data_prep.train_tokenizer --existing /models/llama/tokenizer.model --out /data/tok/llama

Writes ``OUT.model`` and ``OUT.vocab`` (never over existing files unless ``--overwrite``).
Defaults: BPE with byte fallback (every byte is a piece, so nothing is ever unknown), identity
normalisation and no whitespace folding (code keeps its indentation; decode(encode(text)) == text,
control characters included), digits split. Special tokens, fixed ids: ``<unk>`` 0, ``<s>`` (BOS)
1, ``</s>`` (EOS, appended to every document in the shards) 2, ``<pad>`` 3, then
``--user-symbols`` in the order given, then the 256 byte pieces and merges.

``--existing M.model`` copies a model after checking it (``data_prep.spm_model``): it must load,
encode, and have an EOS that is a control piece; its other ids may differ from ours.

Sampling: the first ``--docs-per-source`` documents of every input are split into lines (lines
longer than ``--max-sentence-length`` bytes are cut, so nothing is dropped silently), and
a random ``--sample-sentences`` of them are kept (reservoir sampling seeded with ``--seed``, done
here: SentencePiece's own sampling differs from run to run whatever its seed, so the same command
would give another model). Text is read as ``build_shards``
reads it (``data_prep.readers``: lone surrogates become U+FFFD, BOMs are dropped).

Started on N ranks (``mpirun -np N``, ``srun -n N``, e.g. in the same job script as
``build_shards``), rank 0 alone reads the sample and trains; the others wait for it and exit with its
outcome, so the sample and the model are those of a one-process run whatever N.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from typing import Iterator

from data_prep import ranks as ranks_mod
from data_prep import spm_model
from data_prep import subsets as subset_names
from data_prep.identity import file_sha256
from data_prep.readers import ReadStats, SourceSpec, check_inputs, expand_inputs, read_source
from molm_ds.errors import ConfigError, DataError, UserError, one_line
from molm_ds.log import get_logger

log = get_logger("data_prep.tokenizer")

SPECIALS = dict(spm_model.TRAINED_IDS)


class SampleReader:
    """Training sentences from the inputs, with what was read counted per input (``stats``).

    SentencePiece turns an exception raised by its sentence iterator into an opaque RuntimeError; this
    keeps the original (``error``) so the caller can raise it instead."""

    def __init__(self, specs: list[SourceSpec], *, docs_per_source: int, max_bytes: int, subsets=None,
                 skip_corrupt: bool = False):
        self.specs, self.docs_per_source, self.max_bytes = specs, docs_per_source, max_bytes
        self.subsets, self.skip_corrupt = subsets, skip_corrupt
        self.stats = [ReadStats() for _ in specs]
        self.sentences = 0
        self.error: BaseException | None = None

    def __iter__(self) -> Iterator[str]:
        try:
            for spec, stats in zip(self.specs, self.stats):
                docs = read_source(spec, subsets=self.subsets, stats=stats, skip_corrupt=self.skip_corrupt)
                for n, doc in enumerate(docs):
                    if n >= self.docs_per_source:
                        break
                    for s in split_sentences(doc, self.max_bytes):
                        self.sentences += 1
                        yield s
        except Exception as e:
            self.error = e
            raise

    def total(self, key: str) -> int:
        return sum(getattr(s, key) for s in self.stats)

    def set_names(self) -> dict:
        seen: dict = {}
        for s in self.stats:
            for k, v in s.set_names.items():
                seen[k] = seen.get(k, 0) + v
        return seen


def split_sentences(doc: str, max_bytes: int) -> Iterator[str]:
    """The non-blank lines of a document, each cut into pieces of at most max_bytes UTF-8 bytes."""
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


def reservoir(items: Iterator[str], k: int, seed: int) -> list[str]:
    """A uniform random sample of ``k`` items (all of them when there are fewer), the same for the same seed."""
    rng = random.Random(seed)
    out: list[str] = []
    for i, item in enumerate(items):
        if i < k:
            out.append(item)
        else:
            j = rng.randrange(i + 1)
            if j < k:
                out[j] = item
    return out


def _check_options(vocab_size, sample_sentences, docs_per_source, character_coverage, max_sentence_length,
                   threads, user_symbols, byte_fallback) -> None:
    for name, v in (("--sample-sentences", sample_sentences), ("--docs-per-source", docs_per_source),
                    ("--max-sentence-length", max_sentence_length), ("--vocab-size", vocab_size)):
        if not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name} must be a whole number >= 1, got {v!r}")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"--threads must be a whole number >= 1, got {threads!r}")
    if not 0.0 < character_coverage <= 1.0:
        raise ConfigError(f"--character-coverage must be in (0, 1], got {character_coverage}")
    min_vocab = len(SPECIALS) + len(user_symbols) + (256 if byte_fallback else 0) + 1
    if vocab_size < min_vocab:
        raise ConfigError(f"vocab_size {vocab_size} is too small: specials, user symbols and "
                          f"{'256 byte pieces' if byte_fallback else 'characters'} need at least {min_vocab}")


def _refuse_existing(out_prefix: str, overwrite: bool) -> None:
    existing = [p for p in (out_prefix + ".model", out_prefix + ".vocab") if os.path.exists(p)]
    if existing and not overwrite:
        raise DataError(f"{existing[0]} exists (shards built with it would no longer match it); use another --out "
                        "or pass --overwrite")


def _spm_error(e: RuntimeError, vocab_size: int, character_coverage: float) -> DataError:
    text = str(e)
    m = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", text)
    if m:
        return DataError(f"vocab_size {vocab_size} is smaller than the {m.group(2)} pieces the sample needs (its "
                         f"characters at character_coverage={character_coverage}, plus specials): raise "
                         f"--vocab-size to at least {m.group(2)} or lower --character-coverage")
    m = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", text)
    if m:
        return DataError(f"vocab_size {vocab_size} is more than this sample can fill (at most {m.group(2)} pieces): "
                         "give more text (--input, --docs-per-source) or lower --vocab-size")
    return DataError(f"SentencePiece could not train on this sample: {spm_model.spm_message(e)}")


def train_tokenizer(specs: list[SourceSpec], out_prefix: str, *, vocab_size: int = 32000,
                    sample_sentences: int = 2_000_000, docs_per_source: int = 100_000,
                    character_coverage: float = 0.9995, user_symbols: tuple[str, ...] = (),
                    threads: int | None = None, model_type: str = "bpe", byte_fallback: bool = True,
                    max_sentence_length: int = 8192, subsets=None, skip_corrupt: bool = False,
                    seed: int = 0, overwrite: bool = False, report: list | None = None) -> str:
    """Train and return the path of ``out_prefix.model`` (written atomically). ``report``: if given, lines
    describing what the sample dropped or replaced are appended to it (the command prints them)."""
    import sentencepiece as spm

    if not specs:
        raise ConfigError("no inputs given: pass --input KIND:PATH (one or more), or --existing MODEL")
    _check_options(vocab_size, sample_sentences, docs_per_source, character_coverage, max_sentence_length,
                   threads, user_symbols, byte_fallback)
    _refuse_existing(out_prefix, overwrite)
    check_inputs(specs, skip_corrupt)
    subset_names.check_before_run(specs, subsets)
    os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
    tmp_prefix = out_prefix + ".tmp"
    sample = SampleReader(specs, docs_per_source=docs_per_source, max_bytes=max_sentence_length, subsets=subsets,
                          skip_corrupt=skip_corrupt)
    spm.set_random_generator_seed(seed)
    chosen = reservoir(iter(sample), sample_sentences, seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(chosen),
            model_prefix=tmp_prefix, model_type=model_type, vocab_size=vocab_size,
            character_coverage=character_coverage, byte_fallback=byte_fallback,
            input_sentence_size=0, shuffle_input_sentence=False,
            max_sentence_length=max_sentence_length, num_threads=threads or os.cpu_count() or 1,
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
            split_digits=True, allow_whitespace_only_pieces=True, user_defined_symbols=list(user_symbols),
            pad_piece="<pad>", unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>", **SPECIALS,
            minloglevel=2,
        )
    except RuntimeError as e:
        for p in (tmp_prefix + ".model", tmp_prefix + ".vocab"):
            if os.path.exists(p):
                os.remove(p)
        if isinstance(sample.error, UserError):
            raise sample.error from None
        if sample.error is not None:
            raise sample.error
        if sample.sentences == 0:
            raise _nothing_error(sample, subsets) from None
        raise _spm_error(e, vocab_size, character_coverage) from None
    with open(tmp_prefix + ".model", "rb") as f:
        raw = f.read()
    with open(tmp_prefix + ".model", "wb") as f:
        f.write(spm_model.canonical_bytes(raw))
    got = spm_model.ids(spm_model.load(tmp_prefix + ".model"))
    assert got == SPECIALS, f"SentencePiece gave special ids {got}, expected {SPECIALS}"
    os.replace(tmp_prefix + ".vocab", out_prefix + ".vocab")
    os.replace(tmp_prefix + ".model", out_prefix + ".model")
    if report is not None:
        report.extend(sample_report(sample, subsets))
    return out_prefix + ".model"


def _nothing_error(sample: SampleReader, subsets) -> DataError:
    parts = [f"no training text: {len(sample.specs)} input(s) gave no non-blank line"]
    if subsets:
        parts += subset_names.unmatched(subsets, sample.set_names())
    if sample.total("skipped_corrupt"):
        parts.append(f"{sample.total('skipped_corrupt')} records/documents were dropped as corrupt")
    return DataError("; ".join(parts))


def sample_report(sample: SampleReader, subsets) -> list[str]:
    docs = sample.total("docs")
    out = [f"sample: {docs} documents, {sample.sentences} lines from {len(sample.specs)} input(s)"]
    if sample.total("skipped_corrupt") or sample.total("undecodable_bytes") or any(s.truncated for s in sample.stats):
        out.append(f"skipped (--skip-corrupt): {sample.total('skipped_corrupt')} corrupt records/documents "
                   f"({sample.total('skipped_bytes'):,} bytes), {sample.total('undecodable_bytes'):,} undecodable "
                   f"compressed bytes, {sum(s.truncated for s in sample.stats)} input(s) truncated")
        out += [f"  {e}" for s in sample.stats for e in s.first_errors][:5]
    if sample.total("surrogates"):
        out.append(f"replaced {sample.total('surrogates')} lone surrogate(s) with U+FFFD in "
                   f"{sample.total('surrogate_docs')} document(s)")
    out += [f"warning: {w}" for w in subset_names.unmatched(subsets, sample.set_names())]
    return out


def adopt_existing(model: str, out_prefix: str, *, overwrite: bool = False) -> str:
    """Check ``model`` (``data_prep.spm_model``) and copy it to ``out_prefix.model``."""
    spm_model.check(spm_model.load(model), model)
    dest = out_prefix + ".model"
    if os.path.exists(dest) and os.path.abspath(dest) != os.path.abspath(model):
        if file_sha256(dest) != file_sha256(model) and not overwrite:
            raise DataError(f"{dest} exists and differs from {model}; use another --out or pass --overwrite")
    if os.path.abspath(dest) != os.path.abspath(model):
        os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
        shutil.copyfile(model, dest + ".tmp")
        os.replace(dest + ".tmp", dest)
    return dest


def main(argv=None) -> int:
    from molm_ds import cli
    from data_prep.options import positive_int, unit_fraction

    p = cli.ArgumentParser(prog="python -m data_prep.train_tokenizer", description=__doc__)
    p.add_argument("--input", action="append", default=[], metavar="KIND:PATH",
                   help="a corpus file (glob allowed); KIND: pile, cc100, jsonl, text, lines, hf. Repeat for more.")
    p.add_argument("--out", required=True, help="output prefix: writes OUT.model and OUT.vocab")
    p.add_argument("--existing", help="check this existing .model and copy it to OUT.model instead of training")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT.model / OUT.vocab")
    p.add_argument("--vocab-size", type=positive_int, default=32000)
    p.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    p.add_argument("--no-byte-fallback", action="store_true", help="unknown characters become <unk>")
    p.add_argument("--sample-sentences", type=positive_int, default=2_000_000, help="lines kept for training (a seeded random sample)")
    p.add_argument("--docs-per-source", type=positive_int, default=100_000, help="documents read from each input")
    p.add_argument("--character-coverage", type=unit_fraction, default=0.9995)
    p.add_argument("--user-symbols", default="", help="comma-separated extra symbols that are never split")
    p.add_argument("--max-sentence-length", type=positive_int, default=8192, help="bytes; longer lines are cut")
    p.add_argument("--pile-subset", action="append", help="keep only these meta.pile_set_name values")
    p.add_argument("--skip-corrupt", action="store_true", help="drop and count corrupt input instead of stopping")
    p.add_argument("--threads", type=positive_int, default=None)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.existing and a.input:
        p.error("give either --input (to train) or --existing (to adopt a model), not both")
    if not a.existing and not a.input:
        p.error("give --input KIND:PATH (one or more) to train, or --existing MODEL")
    ranks = ranks_mod.detect()
    if ranks.rank != 0:  # the sample must not depend on N: rank 0 trains, the others take its outcome
        outcome = ranks.bcast(None)
        if outcome is not None:
            raise DataError(f"rank 0 stopped: {outcome}")
        return 0
    try:
        _train_or_adopt(a)
    except Exception as e:
        ranks.bcast(one_line(e) if isinstance(e, UserError) else repr(e))
        raise
    ranks.bcast(None)
    return 0


def _train_or_adopt(a) -> None:
    report: list[str] = []
    if a.existing:
        path = adopt_existing(a.existing, a.out, overwrite=a.overwrite)
    else:
        path = train_tokenizer(
            expand_inputs(a.input), a.out, vocab_size=a.vocab_size, sample_sentences=a.sample_sentences,
            docs_per_source=a.docs_per_source, character_coverage=a.character_coverage,
            user_symbols=tuple(s for s in a.user_symbols.split(",") if s), threads=a.threads,
            model_type=a.model_type, byte_fallback=not a.no_byte_fallback,
            max_sentence_length=a.max_sentence_length, subsets=set(a.pile_subset) if a.pile_subset else None,
            skip_corrupt=a.skip_corrupt, seed=a.seed, overwrite=a.overwrite, report=report)
    rec = spm_model.tokenizer_record(path)
    for line in report:
        print(line)
    print(f"tokenizer: {path} (vocab {rec['vocab_size']}, unk {rec['unk_id']}, bos {rec['bos_id']}, "
          f"eos {rec['eos_id']}, pad {rec['pad_id']}; sha256 {rec['sha256'][:16]}...)")
    if a.existing and spm_model.ids(spm_model.load(path)) != SPECIALS:
        print(f"note: its special ids differ from those data_prep trains ({SPECIALS}); that is fine: build_shards "
              "records them in the manifest and the loader reads them from there")


if __name__ == "__main__":
    from molm_ds import cli

    cli.run(main)
