"""Perplexity and bits per byte of a trained model on held-out data, per source: a table and a JSON file.

One process (CPU or one GPU):
    python launch/evaluate.py --checkpoint runs/demo/checkpoints \\
        --data data/embedded/shards/code 'text:notes/*.txt' jsonl:held_out.jsonl --out eval.json
Several ranks (each scores 1/N of the windows; the sums are all-reduced, the result equals one process):
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launch/evaluate.py --checkpoint CKPT --data ...
    mpirun -np 2 python launch/evaluate.py --checkpoint CKPT --data ...
Installed: molm-eval --checkpoint CKPT --data ...

--checkpoint: a trainer checkpoint directory (newest complete tag) or step_NNNNNNNN tag (bf16/fp16 runs:
the fp32 master weights), or an exported / released Hugging Face directory. --data: shard directories
(or Megatron prefixes) and raw text as KIND:PATH, KIND one of pile, cc100, jsonl, text, lines, hf, read as
data_prep reads them and tokenised with the run's tokenizer (--tokenizer to override). Every window
is scored (--stride < --seq-len for overlapping context). --context document scores each document
alone after an EOS (= lm-evaluation-harness loglikelihood_rolling with prefix EOS and
max_length = --seq-len); --context stream scores the documents back to back, as the trainer reads them.
--split val|test scores only the documents of that held-out split of each shard source, as the trainer's
loader holds them out (data.split_by document or auto; the fractions default to the checkpoint job's
data.val_fraction / data.test_fraction); a job that splits by position has no whole held-out documents.
"""

from __future__ import annotations

import json
import math
import os
import sys

if not __package__:  # run as a script from the checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from molm_ds import cli  # noqa: E402


def parse_args(argv=None):
    from molm_ds.perplexity import CONTEXTS

    p = cli.ArgumentParser(prog="launch/evaluate.py", description=__doc__.split("\n")[0], epilog=__doc__)
    p.add_argument("--checkpoint", required=True, help="trainer checkpoint dir / tag, or a Hugging Face directory")
    p.add_argument("--data", required=True, nargs="+", help="shard directories and/or KIND:PATH text sources")
    p.add_argument("--tokenizer", default=None, help="SentencePiece .model (default: the run's)")
    p.add_argument("--seq-len", type=int, default=None, help="window length (default: the trained context length)")
    p.add_argument("--stride", type=int, default=None, help="new targets per window after the first (default: --seq-len)")
    p.add_argument("--context", choices=CONTEXTS, default="document", help="score documents alone or as one stream")
    p.add_argument("--score-eos", action="store_true", help="document context: also score each document's closing EOS")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward (per rank)")
    p.add_argument("--max-docs", type=int, default=None, help="at most this many documents per source")
    p.add_argument("--text-key", default="text", help="field of jsonl / hf records holding the text")
    p.add_argument("--device", default="auto", help="auto (the rank's GPU if there is one), cpu or cuda")
    p.add_argument("--no-masters", action="store_true", help="bf16 checkpoints: the saved bf16 weights, not the fp32 masters")
    p.add_argument("--split", choices=("all", "train", "val", "test"), default="all",
                   help="score every document (all) or one split's documents (shard sources split by document)")
    p.add_argument("--val-fraction", type=float, default=None, help="default: the checkpoint job's data.val_fraction")
    p.add_argument("--test-fraction", type=float, default=None, help="default: the checkpoint job's data.test_fraction")
    p.add_argument("--out", default="eval.json", help="JSON results (rank 0 writes; a file)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--local_rank", type=int, default=None, help=cli.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("seq_len", "stride", "batch_size", "max_docs"):
        v = getattr(args, name)
        if v is not None and v < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.stride is not None and args.seq_len is not None and args.stride > args.seq_len:
        p.error(f"--stride {args.stride} is larger than --seq-len {args.seq_len}: every window would skip targets")
    if args.score_eos and args.context == "stream":
        p.error("--score-eos is for --context document (a stream scores every EOS already)")
    return args


def _check_sources(specs: list[str]) -> None:
    """Refuse a missing or unreadable source before any model is loaded."""
    from data_prep.readers import expand_inputs
    from molm_ds.data.manifest import source_shards
    from molm_ds.perplexity import is_text_source

    for s in specs:
        if is_text_source(s):
            expand_inputs([s])
        else:
            source_shards(s)


def resolve_split(args, job: dict):
    """None (every document) or (split, val_fraction, test_fraction) with the job's data section as default;
    ConfigError for a job split by position (its held-out windows cut documents) or a text source."""
    from molm_ds.errors import ConfigError
    from molm_ds.perplexity import is_text_source

    if args.split == "all":
        return None
    data = job.get("data") or {}
    val = args.val_fraction if args.val_fraction is not None else data.get("val_fraction", 0.01)
    test = args.test_fraction if args.test_fraction is not None else data.get("test_fraction", 0.0)
    if data and data.get("split_by", "position") == "position":
        raise ConfigError(f"--split {args.split}: the checkpoint's job splits its data by position (data.split_by), so "
                          "its held-out windows cut documents; train with data.split_by document (or auto) to score "
                          "a held-out split by document, or use --split all")
    if args.split == "test" and test <= 0:
        raise ConfigError("--split test: the test fraction is 0 (the job has no data.test_fraction); pass "
                          "--test-fraction F")
    for s in args.data:
        if is_text_source(s):
            raise ConfigError(f"--split {args.split}: {s} is raw text, which has no split; give shard directories")
        if data.get("split_by") == "auto":  # the loader may have fallen back to position for this source
            from molm_ds.data.mixture import split_source
            from molm_ds.data.packing import TokenStream

            if split_source(TokenStream(s), data["seq_len"], val, test, "auto")[1] != "document":
                raise ConfigError(f"--split {args.split}: the trainer split {s} by position (its documents do not "
                                  "allow a split by document), so no whole document is held out; use --split all")
    return (args.split, val, test)


def main(argv=None) -> int:
    args = parse_args(argv)
    from molm_ds.devices import resolve_device
    from molm_ds.errors import ConfigError
    from molm_ds.loading import load_source
    from molm_ds.paths import check_output_file
    from molm_ds.storage import atomic_write_text
    from molm_ds.log import setup_logging
    from molm_ds.parallel import comm
    from molm_ds.perplexity import bits_per_byte, read_documents, rolling_windows, sequences, window_batches
    from molm_ds.tokenizer import load_tokenizer
    from molm_ds.train.distributed import init_distributed, launcher_kind
    from molm_ds.train.evaluate import evaluate

    setup_logging()
    _check_sources(args.data)
    check_output_file(args.out, what="--out", error=ConfigError, overwrite=args.overwrite)
    device = resolve_device(args.device)
    rank, world = init_distributed() if launcher_kind() != "single" else (0, 1)
    src = load_source(args.checkpoint, tokenizer=args.tokenizer, masters=not args.no_masters)
    if src.tokenizer_path is None:
        raise ConfigError(f"{args.checkpoint}: its tokenizer is not known (the data manifests name none, or it moved); "
                          "pass --tokenizer M.model")
    tok = load_tokenizer(src.tokenizer_path)
    seq_len = args.seq_len or src.context_length
    if seq_len is None:
        raise ConfigError(f"{args.checkpoint} does not say its context length; pass --seq-len N")
    stride = args.stride or seq_len
    if stride > seq_len:
        raise ConfigError(f"--stride {stride} is larger than the window length {seq_len}; lower --stride")
    split = resolve_split(args, src.job or {})
    model = src.model.to(device)

    rows = []
    for spec in args.data:
        docs = read_documents(spec, tok, max_docs=args.max_docs, text_key=args.text_key, split=split)
        windows = [w for seq in sequences(docs, eos_id=tok.eos_id, context=args.context, score_eos=args.score_eos)
                   for w in rolling_windows(seq, prefix=tok.eos_id, seq_len=seq_len, stride=stride)]
        res = evaluate(model, window_batches(windows[rank::world], batch_size=args.batch_size, pad_id=tok.pad_id))
        rows.append({"source": spec, "documents": len(docs.ids), "tokens": res.tokens, "bytes": docs.n_bytes,
                     "loss": res.loss, "ppl": res.ppl, "bits_per_byte": bits_per_byte(res.loss, res.tokens, docs.n_bytes)})
    nats = sum(r["loss"] * r["tokens"] for r in rows)
    tokens = sum(r["tokens"] for r in rows)
    n_bytes = None if any(r["bytes"] is None for r in rows) else sum(r["bytes"] for r in rows)
    total = {"source": "all", "documents": sum(r["documents"] for r in rows), "tokens": tokens, "bytes": n_bytes,
             "loss": nats / tokens, "ppl": math.exp(min(nats / tokens, 50.0)),
             "bits_per_byte": bits_per_byte(nats / tokens, tokens, n_bytes)}

    if rank == 0:
        width = max(len(r["source"]) for r in rows + [total])
        print(f"{'source':<{width}} {'docs':>7} {'tokens':>10} {'loss':>8} {'ppl':>10} {'bits/byte':>9}")
        for r in rows + ([total] if len(rows) > 1 else []):
            bpb = "-" if r["bits_per_byte"] is None else f"{r['bits_per_byte']:.4f}"
            print(f"{r['source']:<{width}} {r['documents']:>7} {r['tokens']:>10} {r['loss']:>8.4f} {r['ppl']:>10.3f} {bpb:>9}")
        out = {"checkpoint": os.path.abspath(args.checkpoint), "kind": src.kind, "fp32_masters": src.masters,
               "tokenizer": tok.name, "seq_len": seq_len, "stride": stride, "context": args.context,
               "score_eos": args.score_eos, "split": args.split,
               "fractions": None if split is None else {"val": split[1], "test": split[2]},
               "world_size": world, "sources": rows, "all": total}
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        atomic_write_text(args.out, json.dumps(out, indent=1), what="--out")
        print(f"wrote {args.out}")
    comm.barrier()
    return 0


def entry() -> None:
    cli.run(main)


if __name__ == "__main__":
    entry()
