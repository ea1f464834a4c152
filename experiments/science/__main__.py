"""One entry for every claim's grid: ``python -m experiments.science CLAIM --out DIR [options]``.

CLAIM is s1 (MI vs Switch balance), s2 (MoE vs dense), s3 (continual learning) or s4 (concentration +
pruning); the options are the claim's own (``python -m experiments.science s1 --help``). The same as
``python -m experiments.s1_balance ...`` etc.
"""

from __future__ import annotations

import importlib
import sys

from molm_ds import cli

CLAIMS = {"s1": "experiments.s1_balance", "s2": "experiments.s2_dense", "s3": "experiments.s3_continual",
          "s4": "experiments.s4_prune"}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    claim, rest = argv[0], argv[1:]
    if claim not in CLAIMS:
        cli.fail(f"unknown claim {claim!r}: choose one of {', '.join(CLAIMS)} (python -m experiments.science --help)")
    return importlib.import_module(CLAIMS[claim]).main(rest)


if __name__ == "__main__":
    cli.run(main)
