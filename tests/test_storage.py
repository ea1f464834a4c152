"""molm_ds.storage on a real full filesystem (a small tmpfs; root only): a refused write is one
StorageError naming what, where and the free space, and leaves no partial file behind."""

from __future__ import annotations

import errno
import os

import pytest

from molm_ds.storage import StorageError, as_storage_error, atomic_write_text, guarded_write
from molm_ds.testing import fill, read_only, tmpfs

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


def test_atomic_write_on_a_full_disk_keeps_the_old_file_and_no_temporary(tmp_path):
    with tmpfs(tmp_path / "fs", "64k") as fs:
        path = os.path.join(fs, "job.yaml")
        atomic_write_text(path, "old\n", what="job.yaml")
        fill(fs)
        with pytest.raises(StorageError) as e:
            atomic_write_text(path, "x" * 100_000, what="job.yaml")
        assert sorted(os.listdir(fs)) == ["filler", "job.yaml"]
        assert open(path).read() == "old\n"
    msg = str(e.value)
    assert msg.startswith(f"cannot write job.yaml {path}: no space left on the device") and "needed" in msg


def test_guarded_write_cleans_up_what_it_was_told_and_keeps_other_errors(tmp_path):
    with tmpfs(tmp_path / "fs", "64k") as fs:
        part = os.path.join(fs, "part.tmp")
        fill(fs)
        with pytest.raises(StorageError, match="cannot write shard"):
            with guarded_write("shard", part, cleanup=[part]):
                with open(part, "wb", buffering=0) as f:
                    f.write(b"\0" * 100_000)
        assert not os.path.exists(part)
    with pytest.raises(KeyError):  # not a storage error: a bug keeps its traceback
        with guarded_write("x", str(tmp_path)):
            raise KeyError("bug")
    assert as_storage_error(OSError(errno.ENOENT, "missing", "f")) is None
    assert "read-only" in str(as_storage_error(OSError(errno.EROFS, "ro", "/x/f")))


def test_a_read_only_directory_is_a_storage_error(tmp_path):
    (tmp_path / "ro").mkdir()
    with read_only(tmp_path / "ro") as ro:
        with pytest.raises(StorageError, match="the filesystem is read-only"):
            atomic_write_text(os.path.join(ro, "m.json"), "{}", what="report")
