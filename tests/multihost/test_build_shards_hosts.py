"""build_shards across 2 hosts (network namespaces sharing the filesystem, tests/multihost/conftest.py):
mpirun on host 0 starts 2 ranks on each host through the namespace rsh agent; the directory equals a
one-process build byte for byte, and a run that loses a rank on host 1 is finished by host 0 alone."""

import json
import lzma
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "data_prep"))
from test_build_shards import docs_for, write_pile  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
pytest.importorskip("mpi4py", reason="mpi4py is not installed")
BIN = Path(sys.executable).parent
DIE = REPO / "tests" / "data_prep" / "_die_after.py"


def env(**extra) -> dict:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMIX_", "PRTE_", "SLURM_"))}
    e.update(PATH=f"{BIN}{os.pathsep}{e.get('PATH', '')}", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1",
             OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
             PRTE_MCA_plm_ssh_agent=f"{sys.executable} {REPO / 'scripts' / 'hosts.py'} rsh", **extra)
    return e


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    import pydoc_data.topics

    from data_prep.readers import SourceSpec
    from data_prep.train_tokenizer import train_tokenizer

    d = tmp_path_factory.mktemp("tok")
    with open(d / "train.jsonl", "w") as f:
        for t in list(pydoc_data.topics.topics.values())[:30]:
            f.write(json.dumps({"text": t}) + "\n")
    return train_tokenizer([SourceSpec("jsonl", str(d / "train.jsonl"))], str(d / "tok"), vocab_size=512, threads=1)


def tree(d: Path) -> dict:
    return {n: (d / n).read_bytes() for n in sorted(os.listdir(d))}


@pytest.fixture
def work(tmp_path, tokenizer):
    """Inputs (one split over the ranks, small ones whole), and a one-process build moved to ref/."""
    (tmp_path / "in").mkdir()
    write_pile(tmp_path / "in/00.jsonl.zst", [t for i in range(4) for t in docs_for(i)])
    for i in (1, 2, 3):
        write_pile(tmp_path / f"in/{i:02d}.jsonl.zst", docs_for(10 + i)[: 3 * i])
    (tmp_path / "in/sw.txt.xz").write_bytes(lzma.compress("\n\n".join(f"Hati {j}" for j in range(5)).encode()))
    args = ["python", "-m", "data_prep.build_shards", "--tokenizer", tokenizer, "--out", "out",
            "--input", "pile:in/*.jsonl.zst", "--input", "cc100:in/sw.txt.xz", "--docs-per-shard", "4",
            "--workers", "1", "--no-progress"]
    r = subprocess.run(args, cwd=tmp_path, env=env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    os.rename(tmp_path / "out", tmp_path / "ref")
    return tmp_path, args


def mpirun(h, n: int, args, cwd, hosts=(0, 1), script=None, **extra) -> subprocess.CompletedProcess:
    """``mpirun -np n`` on host 0 over ``hosts`` (2 slots each)."""
    (cwd / "hostfile").write_text("".join(f"{h.hostname(i)} slots=2\n" for i in hosts))
    argv = ["mpirun", "-np", str(n), "--hostfile", "hostfile", "-x", "PATH", "-x", "PYTHONPATH", "-x", "OMP_NUM_THREADS"]
    argv += [a for k in extra for a in ("-x", k)]
    argv += ["python", str(script), *args[3:]] if script else args
    return h.run(0, argv, cwd=cwd, env=env(**extra), capture_output=True, text=True, timeout=300)


def test_two_hosts_write_the_one_process_output(hosts2, work):
    d, args = work
    r = mpirun(hosts2, 4, args, d)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert tree(d / "out") == tree(d / "ref")
    ranks_on = [line.rsplit(" on ", 1)[1] for line in r.stdout.splitlines() if line.strip().startswith("rank ")]
    assert sorted(ranks_on) == sorted([hosts2.hostname(0)] * 2 + [hosts2.hostname(1)] * 2), r.stdout


def test_a_rank_lost_on_host_1_then_host_0_finishes_alone(hosts2, work):
    d, args = work
    r = mpirun(hosts2, 4, args, d, script=DIE, DIE_RANK="3", DIE_AFTER="1")  # ranks 2, 3 are on host 1
    assert r.returncode != 0
    assert not (d / "out/manifest.json").exists()
    assert json.loads((d / "out/progress.json").read_text())["fingerprint"]["docs_per_shard"] == 4
    r = mpirun(hosts2, 2, args, d, hosts=(0,))
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert tree(d / "out") == tree(d / "ref")
