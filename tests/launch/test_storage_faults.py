"""A real full filesystem and a real read-only one under the trainer and the after-training commands
(root only: a small tmpfs, a read-only bind mount, both unmounted in a finally). Each ends in one
`error:` line, exit code 2, no traceback, naming what could not be written and where; the previous
checkpoint stays the resume target."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from molm_ds.testing import REPO, TIMEOUT, TINY_JOB, fill, read_only, tiny_job_overrides, tmpfs
from molm_ds.testing import launch_env as env

pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")]


def one_error(cmd: list[str]) -> str:
    proc = subprocess.run([sys.executable, *cmd], cwd=REPO, env=env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def pretrain(shard, run_dir, *extra) -> list[str]:
    args = ["launch/pretrain.py", "--config", str(TINY_JOB)]
    for o in tiny_job_overrides(shard, run_dir) + ["training.eval_interval=0", *extra]:
        args += ["--set", o]
    return args


def test_a_full_disk_at_the_start_is_one_line(shard, tmp_path):
    with tmpfs(tmp_path / "fs", "256k") as fs:
        fill(fs)
        line = one_error(pretrain(shard, os.path.join(fs, "run"), "training.steps=2"))
    assert "no space left on the device" in line and str(tmp_path / "fs") in line, line


def test_a_full_disk_under_metrics_and_tensorboard_is_one_line_naming_the_checkpoint(shard, tmp_path):
    ck = tmp_path / "ck"
    with tmpfs(tmp_path / "fs", "256k") as fs:
        fill(fs, leave=8 * 4096)  # room for the lock, job.yaml, the first metrics rows and TensorBoard events
        line = one_error(pretrain(shard, os.path.join(fs, "run"), "training.steps=200", f"checkpoint.dir={ck}",
                                  "checkpoint.interval=1"))
    assert "no space left on the device" in line, line
    assert "newest complete checkpoint is" in line and "--resume auto" in line, line


def test_a_read_only_run_dir_is_refused_before_any_work(shard, tmp_path):
    (tmp_path / "ro").mkdir()
    with read_only(tmp_path / "ro") as ro:
        line = one_error(pretrain(shard, os.path.join(ro, "run"), "training.steps=1"))
    assert "run_dir" in line and ("read-only" in line or "cannot be created" in line), line


def test_after_training_outputs_on_a_read_only_place_are_refused_before_work(shard, tmp_path):
    (tmp_path / "ro").mkdir()
    with read_only(tmp_path / "ro") as ro:
        line = one_error(["launch/generate.py", "--checkpoint", str(tmp_path / "nowhere"), "--prompt", "x",
                          "--out", os.path.join(ro, "g.jsonl")])
        assert "--out" in line and "not writable" in line, line
        line = one_error(["launch/export.py", "--checkpoint", str(tmp_path / "nowhere"), "--out",
                          os.path.join(ro, "hf")])
        assert "--out" in line and "not writable" in line, line


def test_data_prep_on_a_full_disk_is_one_line_and_a_rerun_finishes(tmp_path):
    import json

    import pydoc_data.topics

    from data_prep.readers import SourceSpec
    from data_prep.train_tokenizer import train_tokenizer

    corpus = tmp_path / "in.jsonl"
    corpus.write_text("".join(json.dumps({"text": t[:2000]}) + "\n" for t in list(pydoc_data.topics.topics.values())[:60]))
    tok = train_tokenizer([SourceSpec("jsonl", str(corpus))], str(tmp_path / "tok"), vocab_size=400, threads=1)
    cmd = ["-m", "data_prep.build_shards", "--tokenizer", tok, "--input", f"jsonl:{corpus}", "--workers", "1",
           "--docs-per-shard", "10", "--no-progress"]
    with tmpfs(tmp_path / "fs", "1m") as fs:
        fill(fs, leave=6 * 4096)
        out = os.path.join(fs, "shards")
        line = one_error([*cmd, "--out", out])
        assert "no space left on the device" in line and "shards" in line and "resumes" in line, line
        os.remove(os.path.join(fs, "filler"))  # space again: the same command resumes and finishes
        proc = subprocess.run([sys.executable, *cmd, "--out", out], cwd=REPO, env=env(), capture_output=True,
                              text=True, timeout=TIMEOUT)
        assert proc.returncode == 0, proc.stderr[-3000:]
        from molm_ds.data import check_sources

        check_sources([out])


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint_and_resumes(shard, tmp_path):
    from molm_ds import checkpoint as ckpt

    with tmpfs(tmp_path / "fs", "12m") as fs:  # one tiny checkpoint (about 7.5 MB) fits, the second does not
        run = os.path.join(fs, "run")
        ck = os.path.join(run, "checkpoints")
        line = one_error(pretrain(shard, run, "training.steps=6", "checkpoint.interval=1", "monitor.tensorboard=false",
                                  "training.warmup_steps=0"))
        assert "cannot write checkpoint" in line and "no space left on the device" in line, line
        assert f"newest complete checkpoint is {os.path.join(ck, ckpt.tag_for(1))}" in line, line
        assert ckpt.list_tags(ck) == [ckpt.tag_for(1)], "the partial tag is cleaned up"
        assert ckpt.resolve_resume("auto", ck) == (ck, ckpt.tag_for(1))
        subprocess.run(["mount", "-o", "remount,size=64m", fs], check=True)  # space again
        proc = subprocess.run([sys.executable, *pretrain(shard, run, "training.steps=3", "checkpoint.interval=1",
                                                         "monitor.tensorboard=false", "training.warmup_steps=0"),
                               "--resume", "auto"], cwd=REPO, env=env(), capture_output=True, text=True,
                              timeout=TIMEOUT)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "resumed from" in proc.stdout + proc.stderr and ckpt.newest_complete(ck) == ckpt.tag_for(3)
