"""Fault injection on checkpoints and run directories, in one process: damaged, truncated and missing
files of each kind, a crash while old checkpoints are retired, two jobs on one run_dir, a stale lock,
a fresh start over an earlier run. Each ends in a verified resume or a clear refusal, never silent
damage. (Signals and killed ranks: tests/launch/test_faults.py.)"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time

import pytest

from molm_ds.errors import CheckpointError, ConfigError
from molm_ds import checkpoint as ckpt
from molm_ds.train import load_job
from molm_ds.train.loop import train
from molm_ds.checkpoint import LOCK_FILE
from molm_ds.testing import TINY_JOB, read_metrics, tiny_job_overrides

pytestmark = pytest.mark.slow


def job(shard, run_dir, *extra):
    return load_job(TINY_JOB, tiny_job_overrides(shard, run_dir) + [
        "training.eval_interval=0", "monitor.tensorboard=false", "checkpoint.interval=1"] + list(extra))


@pytest.fixture(scope="module")
def base(shard, tmp_path_factory):
    """A 3-step run with a checkpoint after every step (a pristine copy is made per test)."""
    d = tmp_path_factory.mktemp("base") / "run"
    train(job(shard, d, "training.steps=3"))
    return d


@pytest.fixture
def run_copy(base, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(base, d)
    return d


def _tag(run_dir, step):
    return os.path.join(run_dir, "checkpoints", ckpt.tag_for(step))


def _file(tag_dir, kind):
    """One file of each kind a checkpoint holds."""
    if kind == "elastic":
        sub = os.path.join(tag_dir, ckpt.UNIVERSAL_DIR)
        return os.path.join(sub, sorted(os.listdir(sub))[0])
    pick = {"expert": lambda n: n.startswith("layer_"), "optimizer": lambda n: n.endswith("optim_states.pt"),
            "model": lambda n: n == ckpt.MODEL_FILE, "rng": lambda n: n.startswith("rng_")}[kind]
    return os.path.join(tag_dir, next(n for n in sorted(os.listdir(tag_dir)) if pick(n)))


def _flip(path):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


@pytest.mark.parametrize("kind", ["expert", "optimizer", "model", "rng", "elastic"])
@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_file_is_named_and_auto_falls_back(shard, run_copy, kind, damage):
    tag3 = _tag(run_copy, 3)
    path = _file(tag3, kind)
    {"flip": _flip, "truncate": _truncate, "delete": os.remove}[damage](path)
    name = os.path.relpath(path, tag3)
    with pytest.raises(CheckpointError, match=f"file {name} .*(digest|bytes|missing).*older checkpoint"):
        ckpt.resolve_resume(tag3, os.path.join(run_copy, "checkpoints"))
    # auto: the newest checkpoint that verifies, with the skipped one named in the log
    assert ckpt.resolve_resume("auto", os.path.join(run_copy, "checkpoints")) == (
        os.path.join(run_copy, "checkpoints"), ckpt.tag_for(2))
    if (kind, damage) == ("expert", "flip"):  # and the trainer does resume from there
        s = train(job(shard, run_copy, "training.steps=4", "resume=auto"))
        assert s["step"] == 4 and sorted(read_metrics(run_copy))[-2:] == [3, 4]


def test_retire_crash_leaves_no_marked_partial(run_copy, monkeypatch):
    d = os.path.join(run_copy, "checkpoints")
    real = shutil.rmtree

    def crash_midway(path, *a, **k):  # deletes one file, then the process "dies"
        os.remove(os.path.join(path, sorted(f for f in os.listdir(path) if os.path.isfile(os.path.join(path, f)))[0]))
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        ckpt.marker.retire(d, ckpt.tag_for(1))
    monkeypatch.setattr(shutil, "rmtree", real)
    assert ckpt.list_tags(d) == [ckpt.tag_for(2), ckpt.tag_for(3)]
    assert all(ckpt.verify(d, t) is None for t in ckpt.list_tags(d))
    ckpt.marker.clean_retired(d)
    assert not [n for n in os.listdir(d) if n.startswith(".retired-")]


def test_keep_rotation_leaves_only_verified_tags(shard, tmp_path):
    d = tmp_path / "run"
    train(job(shard, d, "training.steps=4", "checkpoint.keep=2"))
    tags = ckpt.list_tags(os.path.join(d, "checkpoints"))
    assert tags == [ckpt.tag_for(3), ckpt.tag_for(4)]
    assert all(ckpt.verify(os.path.join(d, "checkpoints"), t) is None for t in tags)


def test_marker_lists_every_file_with_size_and_digest(base):
    tag = _tag(base, 3)
    marker = json.load(open(os.path.join(tag, ckpt.COMPLETE)))
    listed = set(marker["files"])
    on_disk = {os.path.relpath(os.path.join(r, f), tag) for r, _, fs in os.walk(tag) for f in fs} - {ckpt.COMPLETE}
    assert listed == on_disk and all(len(v["xxh3"]) == 16 and v["size"] > 0 for v in marker["files"].values())
    assert marker["kind"] == "train" and marker["topology"]["world_size"] == 1 and marker["elastic"] is True


def test_a_second_job_on_a_run_dir_is_refused(shard, tmp_path):
    d = tmp_path / "run"
    os.makedirs(d)
    holder = {"host": socket.gethostname(), "pid": os.getppid(), "started": time.time(), "job": "other-job"}
    (d / LOCK_FILE).write_text(json.dumps(holder))
    with pytest.raises(ConfigError, match=r"in use by job 'other-job' \(host .*, pid \d+"):
        train(job(shard, d, "training.steps=1"))
    assert json.loads((d / LOCK_FILE).read_text()) == holder, "a refused job must leave the holder's lock alone"


def test_a_stale_lock_is_taken_over(shard, tmp_path, caplog):
    d = tmp_path / "run"
    os.makedirs(d)
    dead = {"host": socket.gethostname(), "pid": 2 ** 22 + 17, "started": 0, "job": "crashed"}
    (d / LOCK_FILE).write_text(json.dumps(dead))
    s = train(job(shard, d, "training.steps=1"))
    assert s["step"] == 1 and not (d / LOCK_FILE).exists(), "the lock is released at the end"
    assert "stale lock" in caplog.text
    old = d.parent / "old"
    os.makedirs(old)
    (old / LOCK_FILE).write_text(json.dumps({**dead, "host": "elsewhere", "pid": 1}))
    os.utime(old / LOCK_FILE, (time.time() - 3600, time.time() - 3600))  # no heartbeat for an hour
    assert train(job(shard, old, "training.steps=1"))["step"] == 1


def test_fresh_start_over_an_earlier_run_needs_resume_or_overwrite(shard, run_copy):
    before = sorted(os.listdir(os.path.join(run_copy, "checkpoints")))
    with pytest.raises(ConfigError, match="holds an earlier run.*--resume auto.*--overwrite"):
        train(job(shard, run_copy, "training.steps=2"))
    assert sorted(os.listdir(os.path.join(run_copy, "checkpoints"))) == before, "nothing may be lost"
    assert train(job(shard, run_copy, "training.steps=4", "resume=auto"))["step"] == 4
    s = train(job(shard, run_copy, "training.steps=1", "overwrite=true"))
    assert s["step"] == 1 and sorted(read_metrics(run_copy)) == [1]
    assert ckpt.list_tags(os.path.join(run_copy, "checkpoints")) == [ckpt.tag_for(1)]
