"""README's launch forms for a machine without an ssh server, and evaluation at another world size:
- `deepspeed --hostfile hostfile --no_ssh_check --master_addr 127.0.0.1 ...` trains on 2 ranks of this
  machine (without --no_ssh_check the launcher stops at its ssh check when no ssh server answers);
- `deepspeed --num_gpus 2 launch/evaluate.py` prints the same numbers as one process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from molm_ds.train.distributed import free_port
from molm_ds.testing import BIN, TIMEOUT, assert_trained, job_args
from molm_ds.testing import launch_env as env
from molm_ds.testing import run_command as run
from molm_ds.testing import REPO, write_shard

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def _ssh_answers() -> bool:
    try:
        return subprocess.run(["ssh", "-o", "PasswordAuthentication=no", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5",
                               "localhost", "hostname"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def test_hostfile_without_ssh_server(shard, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    base = [str(BIN / "deepspeed"), "--hostfile", str(hostfile)]
    tail = ["--master_addr", "127.0.0.1", "--master_port", str(free_port())] + job_args(shard, tmp_path / "run")
    if not _ssh_answers():  # the reason for the flag: DeepSpeed's ssh check fails on such a machine
        p = subprocess.run(base + tail, cwd=REPO, env=env(), capture_output=True, text=True, timeout=TIMEOUT)
        assert p.returncode != 0 and "was not reachable via ssh" in (p.stdout + p.stderr)
    out = run(base + ["--no_ssh_check"] + tail)
    assert "rank 1 of 2" in out
    assert_trained(tmp_path / "run")


def test_evaluate_two_ranks_equals_one(tmp_path):
    from molm_ds.config import ModelConfig
    from molm_ds.model import MoLM
    from molm_ds import checkpoint as ckpt

    shard = write_shard(tmp_path / "shard")  # its own: the manifest is rewritten below
    ckpt.write_model(MoLM(ModelConfig.from_preset("tiny")), {"data": {"sources": [{"path": shard}], "seq_len": 32}},
                     str(tmp_path / "ckpt"), tag="step_00000001", kind="test")
    tok = _tokenizer(tmp_path)
    manifest = Path(shard) / "manifest.json"  # the synthetic shard's ids all fit this tokenizer: let it say so
    man = json.loads(manifest.read_text())
    from data_prep.identity import file_sha256

    man["tokenizer"].update(model_path=tok, sha256=file_sha256(tok))
    manifest.write_text(json.dumps(man))
    args = ["launch/evaluate.py", "--checkpoint", str(tmp_path / "ckpt"), "--data", shard, "--max-docs", "9",
            "--batch-size", "3"]
    run([sys.executable] + args + ["--out", str(tmp_path / "one.json")])
    run([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port())] + args
        + ["--out", str(tmp_path / "two.json")])
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["all"]["tokens"] == one["all"]["tokens"] > 0
    assert two["all"]["loss"] == pytest.approx(one["all"]["loss"], rel=1e-6)


def _tokenizer(tmp_path: Path) -> str:
    """A SentencePiece model with data_prep's special ids (EOS 2), for the synthetic shard's documents."""
    from data_prep.readers import SourceSpec
    from data_prep.train_tokenizer import train_tokenizer
    from molm_ds.testing import corpus_lines

    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(corpus_lines()))
    return train_tokenizer([SourceSpec("lines", str(text))], str(tmp_path / "tok"), vocab_size=512, threads=1)
