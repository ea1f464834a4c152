"""``molm-prepare-data COMMAND ...``: the data preparation commands under one console script.

    molm-prepare-data embedded --out data/embedded          # = python -m data_prep.embedded ...
    molm-prepare-data tokenizer --input text:corpus.txt --out tok/molm --vocab-size 32000
    molm-prepare-data shards --tokenizer tok/molm.model --input 'pile:/data/pile/*.jsonl.zst' --out shards/pile
    molm-prepare-data identity FILE ...

Each command is the module of the same job (``--help`` on each); this only picks it.
"""

from __future__ import annotations

import importlib
import sys

from molm_ds import cli

COMMANDS = {"embedded": "data_prep.embedded", "tokenizer": "data_prep.train_tokenizer",
            "shards": "data_prep.build_shards", "identity": "data_prep.identity"}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        cli.fail(f"give a command: one of {', '.join(COMMANDS)} (see molm-prepare-data --help)")
    if argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        cli.fail(f"unknown command {name!r}; choose one of {', '.join(COMMANDS)} (see molm-prepare-data --help)")
    return importlib.import_module(COMMANDS[name]).main(rest)


def entry() -> None:
    cli.run(main)


if __name__ == "__main__":
    entry()
