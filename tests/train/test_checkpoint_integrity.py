"""Markers that prove themselves, files a marker does not list, and the run lock's empty or corrupt
file: real files damaged on disk, one process. (Damaged checkpoint files: test_checkpoint_faults.py.)"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time

import pytest

from molm_ds import checkpoint as ckpt
from molm_ds.checkpoint.lock import LOCK_FILE, RunLock
from molm_ds.errors import CheckpointError, ConfigError
from molm_ds.train import load_job
from molm_ds.train.loop import train
from molm_ds.testing import TINY_JOB, tiny_job_overrides, write_shard

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    shard = write_shard(tmp_path_factory.mktemp("data"))
    d = tmp_path_factory.mktemp("base") / "run"
    train(load_job(TINY_JOB, tiny_job_overrides(shard, d) + [
        "training.eval_interval=0", "monitor.tensorboard=false", "checkpoint.interval=1", "training.steps=2"]))
    return d


@pytest.fixture
def ck(base, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(base, d)
    return str(d / "checkpoints")


def _marker(ck, step):
    return os.path.join(ck, ckpt.tag_for(step), ckpt.COMPLETE)


def _rewrite(path, fn):
    m = json.loads(open(path).read())
    fn(m)
    with open(path, "w") as f:
        json.dump(m, f)


def _damage(path, how):
    raw = open(path, "rb").read()
    if how == "empty":
        open(path, "wb").close()
    elif how == "truncated":
        open(path, "wb").write(raw[: len(raw) // 2])
    elif how == "undecodable":
        open(path, "wb").write(raw[:10] + b"\xff\xfe" + raw[12:])
    elif how == "no_checksum":
        _rewrite(path, lambda m: m.pop("checksum"))
    elif how == "edited":  # a size changed by hand: the marker no longer matches its own checksum
        _rewrite(path, lambda m: m["files"][sorted(m["files"])[0]].update(size=1))
    elif how == "schema":  # a well-formed marker with a good checksum but no file list
        from molm_ds.checkpoint.marker import _checksum

        def strip(m):
            m.pop("checksum")
            m.pop("files")
            m["checksum"] = _checksum(m)
        _rewrite(path, strip)
    elif how == "outside":  # a listed name that climbs out of the tag
        from molm_ds.checkpoint.marker import _checksum

        def climb(m):
            m.pop("checksum")
            m["files"]["../../x"] = {"size": 1, "xxh3": "0" * 16}
            m["checksum"] = _checksum(m)
        _rewrite(path, climb)


@pytest.mark.parametrize("how", ["empty", "truncated", "undecodable", "no_checksum", "edited", "schema", "outside"])
def test_a_marker_that_does_not_prove_itself_is_not_verified(ck, how):
    _damage(_marker(ck, 2), how)
    # and the newest tag's optimizer shard is truncated: trusting the marker would die in torch.load
    tag2 = os.path.join(ck, ckpt.tag_for(2))
    shard = next(os.path.join(tag2, n) for n in os.listdir(tag2) if n.endswith("optim_states.pt"))
    os.truncate(shard, os.path.getsize(shard) // 2)
    problem = ckpt.verify(ck, ckpt.tag_for(2))
    assert problem is not None and ckpt.COMPLETE in problem and "not verified" in problem, problem
    assert ckpt.resolve_resume("auto", ck) == (ck, ckpt.tag_for(1)), "auto falls back to the tag that verifies"
    with pytest.raises(CheckpointError, match=f"{ckpt.COMPLETE}.*not verified"):
        ckpt.resolve_resume(tag2, ck)
    with pytest.raises(CheckpointError, match=ckpt.COMPLETE):
        ckpt.read_marker(ck, ckpt.tag_for(2))


def test_the_marker_carries_its_checksum_and_format(ck):
    m = json.loads(open(_marker(ck, 1)).read())
    assert len(m["checksum"]) == 16 and m["format"] == 2
    assert ckpt.read_marker(ck, ckpt.tag_for(1))["files"] == m["files"]


def test_unlisted_files_are_reported_and_never_loaded(ck, caplog):
    tag = os.path.join(ck, ckpt.tag_for(2))
    stray = os.path.join(tag, "layer_9_expert_9_mp_rank_00_model_states.pt")
    shutil.copy(os.path.join(tag, "layer_0_expert_0_mp_rank_00_model_states.pt"), stray)
    with caplog.at_level(logging.WARNING):
        assert ckpt.verify(ck, ckpt.tag_for(2)) is None
    assert "layer_9_expert_9" in caplog.text and "never loaded" in caplog.text
    assert (9, 9) not in ckpt.list_expert_files(ck, ckpt.tag_for(2))
    ckpt.load_model(tag)  # reads only the listed files


@pytest.mark.parametrize("content", [b"", b'{"host": "x", "pi', b"\xff\xfe\x00", b"[1, 2]", b'{"host": "h"}'])
def test_an_empty_or_corrupt_lock_is_stale_at_once(tmp_path, content, caplog):
    (tmp_path / LOCK_FILE).write_bytes(content)
    lock = RunLock(str(tmp_path), job_name="me")
    t0 = time.time()
    with caplog.at_level(logging.WARNING):
        lock.acquire()
    try:
        assert time.time() - t0 < 5 and "empty or corrupt" in caplog.text
        assert json.loads((tmp_path / LOCK_FILE).read_text())["job"] == "me"
    finally:
        lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_live_lock_still_refuses(tmp_path):
    holder = {"host": socket.gethostname(), "pid": os.getppid(), "started": time.time(), "job": "other"}
    (tmp_path / LOCK_FILE).write_text(json.dumps(holder))
    with pytest.raises(ConfigError, match="in use by job 'other'"):
        RunLock(str(tmp_path), job_name="me").acquire()
    assert json.loads((tmp_path / LOCK_FILE).read_text()) == holder
