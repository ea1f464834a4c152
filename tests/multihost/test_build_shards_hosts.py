"""build_shards across 2 hosts (network namespaces sharing the filesystem, tests/multihost/conftest.py):
the hostfile line of docs/data.md "Across machines", run as printed on host 0 (mpirun reaches host 1
through the namespace rsh agent), puts 2 ranks on each host and writes what one process writes; a run
that loses a rank on host 1 is finished by host 0 alone."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.data_prep import doc_across as doc
from tests.multihost.doc_commands import NO_BINDING

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
pytest.importorskip("mpi4py", reason="mpi4py is not installed")
DIE = REPO / "tests" / "data_prep" / "_die_after.py"


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


def on_host(h, i, cmd, cwd, **extra) -> subprocess.CompletedProcess:
    env = doc.env(PRTE_MCA_plm_ssh_agent=f"{sys.executable} {REPO / 'scripts' / 'hosts.py'} rsh", **NO_BINDING, **extra)
    del env["PRTE_MCA_rmaps_default_mapping_policy"]  # the hostfile's slots place the ranks
    return h.run(i, ["sh", "-c", cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def ws(tmp_path, tokenizer):
    """The documented workspace, its one-process build in ref/, and the documented hostfile command."""
    ws = doc.workspace(tmp_path / "ws", tokenizer)
    cmd = doc.commands()["mpirun -np 4 --hostfile"]
    r = subprocess.run(["sh", "-c", doc.one_process(cmd)], cwd=ws, env=doc.env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    (ws / doc.OUT).rename(ws / "ref")
    return ws, cmd


def test_documented_hostfile_line_on_two_hosts(hosts2, ws):
    ws, cmd = ws
    (ws / "hostfile").write_text("".join(f"{hosts2.hostname(i)} slots=2\n" for i in range(2)))
    r = on_host(hosts2, 0, cmd, ws)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert doc.tree(ws / doc.OUT) == doc.tree(ws / "ref")
    ranks_on = [line.rsplit(" on ", 1)[1] for line in r.stdout.splitlines() if line.strip().startswith("rank ")]
    assert sorted(ranks_on) == sorted([hosts2.hostname(0)] * 2 + [hosts2.hostname(1)] * 2), r.stdout


def test_a_rank_lost_on_host_1_then_host_0_finishes_alone(hosts2, ws):
    ws, cmd = ws
    cmd += " --docs-per-shard 4"  # 14 shards, so that the ranks on host 1 have some to write
    r = subprocess.run(["sh", "-c", doc.one_process(cmd)], cwd=ws, env=doc.env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    (ws / doc.OUT).rename(ws / "ref4")
    (ws / "hostfile").write_text("".join(f"{hosts2.hostname(i)} slots=2\n" for i in range(2)))
    dying = cmd.replace(" python -m data_prep.build_shards ", f" -x DIE_RANK -x DIE_AFTER python {DIE} ")
    r = on_host(hosts2, 0, dying, ws, DIE_RANK="3", DIE_AFTER="1")  # ranks 2 and 3 run on host 1
    assert r.returncode != 0, r.stdout
    assert not (ws / doc.OUT / "manifest.json").exists() and (ws / doc.OUT / "progress.json").exists()
    (ws / "hostfile").write_text(f"{hosts2.hostname(0)} slots=2\n")
    r = on_host(hosts2, 0, cmd.replace("-np 4", "-np 2"), ws)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert doc.tree(ws / doc.OUT) == doc.tree(ws / "ref4")
