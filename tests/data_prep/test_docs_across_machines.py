"""docs/data.md "Across machines": the one-machine ``mpirun`` line and the ``srun`` line run as printed
(``srun`` through its environment: mpirun starts the ranks, each sees only Slurm's variables) and
write what one process writes. The hostfile line runs across 2 hosts in tests/multihost."""

import os
import shutil
import subprocess

import pytest

import doc_across as doc

pytest.importorskip("mpi4py", reason="mpi4py is not installed")
HAS_MPIRUN = (doc.BIN / "mpirun").exists() or shutil.which("mpirun") is not None
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not HAS_MPIRUN, reason="mpirun (OpenMPI) is not installed")]


def sh(cmd: str, cwd, **extra) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", "-c", cmd], cwd=cwd, env=doc.env(**extra), capture_output=True, text=True,
                          timeout=300)


@pytest.fixture
def ws(tmp_path, tokenizer):
    """The workspace, and the one-process build of the documented command in ref/."""
    ws = doc.workspace(tmp_path / "ws", tokenizer)
    r = sh(doc.one_process(doc.commands()["mpirun -np 2"]), ws)
    assert r.returncode == 0, r.stderr
    os.rename(ws / doc.OUT, ws / "ref")
    return ws


def test_documented_mpirun_line(ws):
    r = sh(doc.commands()["mpirun -np 2"], ws)
    assert r.returncode == 0, r.stderr[-3000:]
    assert doc.tree(ws / doc.OUT) == doc.tree(ws / "ref")
    assert "rank 1 of 2:" in r.stdout


def test_documented_srun_line_through_slurms_environment(ws):
    cmd = doc.commands()["srun"]
    ntasks = 4  # --nodes 2 --ntasks-per-node 2
    assert "--nodes 2 --ntasks-per-node 2" in cmd
    as_srun_task = (f"mpirun -np {ntasks} sh -c 'exec env -u OMPI_COMM_WORLD_RANK -u OMPI_COMM_WORLD_SIZE "
                    f"SLURM_PROCID=$OMPI_COMM_WORLD_RANK SLURM_NTASKS={ntasks} SLURM_LOCALID=0 \"$@\"' task ")
    r = sh(as_srun_task + doc.one_process(cmd), ws)
    assert r.returncode == 0, r.stderr[-3000:]
    assert doc.tree(ws / doc.OUT) == doc.tree(ws / "ref")
    assert "rank 3 of 4:" in r.stdout
