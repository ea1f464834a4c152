"""The commands of docs/data.md "Across machines", and a workspace laid out as they assume (``pile/``,
``cc100/``, ``tok.model``; output ``shards/pile``), for the tests that run them as printed."""

from __future__ import annotations

import lzma
import os
import re
import shutil
import sys
from pathlib import Path

from tests.data_prep.pile_corpus import docs_for, write_pile

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
OUT = "shards/pile"


def commands() -> dict[str, str]:
    """The section's commands by how they start: "mpirun -np 2", "mpirun -np 4 --hostfile", "srun"."""
    text = (REPO / "docs" / "data.md").read_text()
    section = text.split("## Across machines", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    lines = [line for line in block.replace("\\\n", " ").splitlines() if line and not line.startswith("#")]
    cmds = {" ".join(line.split()) for line in lines}
    out = {}
    for key in ("mpirun -np 2 ", "mpirun -np 4 --hostfile", "srun "):
        found = [c for c in cmds if c.startswith(key)]
        assert len(found) == 1, f"docs/data.md Across machines: expected one command starting {key!r}, got {found}"
        out[key.strip()] = found[0]
    return out


def one_process(cmd: str) -> str:
    """The same build without the launcher: everything from ``python`` on."""
    return cmd[cmd.index(" python ") + 1:]


def workspace(root: Path, tokenizer: str) -> Path:
    """Two Pile files (the first large enough to be split over the ranks) and a CC-100 file."""
    (root / "pile").mkdir(parents=True)
    (root / "cc100").mkdir()
    write_pile(root / "pile/00.jsonl.zst", [t for i in range(6) for t in docs_for(i)])
    write_pile(root / "pile/01.jsonl.zst", docs_for(9)[:4])
    (root / "cc100/sw.txt.xz").write_bytes(lzma.compress("\n\n".join(f"Hati {j}" for j in range(5)).encode()))
    shutil.copyfile(tokenizer, root / "tok.model")
    return root


def env(**extra) -> dict:
    """A cluster's environment: ``python`` and ``mpirun`` on PATH; as root, OpenMPI's consent; no launcher
    variables from the caller."""
    e = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_COMM_WORLD", "PMIX_", "PMI_", "SLURM_"))}
    e.update(PATH=f"{BIN}{os.pathsep}{e.get('PATH', '')}", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1",
             OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
             PRTE_MCA_rmaps_default_mapping_policy=":oversubscribe", **extra)
    return e


def tree(d: Path) -> dict:
    return {n: (d / n).read_bytes() for n in sorted(os.listdir(d))}
