"""One job per run directory: a lock file that names its holder and proves it alive with a heartbeat.

    <run_dir>/.molm_ds.lock    {"host", "pid", "started", "job"}; its mtime is refreshed every 30 s

A second job on the same run_dir is refused with the holder's name. A lock is stale (taken over, with a
warning) when its holder ran on this host and its pid is gone, when its heartbeat is older than
``STALE_AFTER_S`` (a holder on another host that crashed), or at once when the file names no owner
(empty, cut short, not JSON): a lock names its owner or is not a lock, and since a lock appears only
whole (a complete temporary file hard-linked into place) no live job's lock is ever empty. A full disk
or a read-only run_dir is one ``StorageError`` line. Rank 0 holds it for the whole job.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import threading
import time
from typing import Optional

from molm_ds import rundir
from molm_ds.errors import ConfigError
from molm_ds.log import get_logger
from molm_ds.storage import guarded_write

log = get_logger("checkpoint.lock")

__all__ = ["RunLock", "LOCK_FILE", "STALE_AFTER_S"]

LOCK_FILE = rundir.LOCK
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    def __init__(self, run_dir: str, *, job_name: str) -> None:
        self.path = os.path.join(run_dir, LOCK_FILE)
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(), "job": job_name}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def holder(self) -> Optional[dict]:
        """The lock's owner record; None when there is no lock; {} when the file names no owner (empty,
        cut short, not JSON, or without host, pid, start time and job)."""
        try:
            with open(self.path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None
        except OSError:
            return {}
        try:
            h = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return {}
        ok = (isinstance(h, dict) and isinstance(h.get("host"), str) and isinstance(h.get("pid"), int)
              and isinstance(h.get("started"), (int, float)) and isinstance(h.get("job"), str))
        return h if ok else {}

    def _stale(self, holder: dict) -> Optional[str]:
        """Why the lock is stale, or None when its holder may be alive. A lock that names no owner is stale
        at once: a lock is written whole before it appears (``_create``), so no live job's lock is empty."""
        if not holder:
            return "the lock file is empty or corrupt (it names no owner: a crash or a full disk while it was written)"
        try:
            age = time.time() - os.path.getmtime(self.path)
        except FileNotFoundError:
            return "gone"
        if holder.get("host") == self.me["host"] and isinstance(holder.get("pid"), int) and not _pid_alive(holder["pid"]):
            return f"its process {holder['pid']} on this host is gone"
        if age > STALE_AFTER_S:
            return f"no heartbeat for {age:.0f}s"
        return None

    def acquire(self) -> None:
        """Take the lock or raise ConfigError naming the job that holds it."""
        for _ in range(3):
            with guarded_write("the run lock", self.path):
                created = self._create()
            if not created:
                holder = self.holder()
                if holder is None:
                    continue
                why = self._stale(holder)
                if why is None:
                    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
                    raise ConfigError(
                        f"run_dir {os.path.dirname(self.path)} is in use by job {holder.get('job')!r} (host "
                        f"{holder.get('host')}, pid {holder.get('pid')}, since {since}): wait for it to finish, stop it, "
                        f"or choose another run_dir")
                log.warning("taking over the stale lock %s of %s (%s)", self.path, holder or "no owner", why)
                with guarded_write("the run lock", self.path):
                    os.replace(self._write_tmp(), self.path)
                if self.holder() == self.me:
                    break
                continue
            break
        else:
            raise ConfigError(f"could not take the lock {self.path}: another job keeps taking it; choose another run_dir")
        self._thread = threading.Thread(target=self._beat, name="molm-ds-run-lock", daemon=True)
        self._thread.start()

    def _create(self) -> bool:
        """Make the lock file with its content in one step (a whole temporary file hard-linked into place,
        which fails if a lock exists): no one ever sees an empty lock of a live job. False if one exists."""
        tmp = self._write_tmp()
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            # a filesystem without hard links: exclusive create, then write (a crash between the two leaves
            # an empty lock, which the next job takes over at once)
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                json.dump(self.me, f)
            return True
        finally:
            try:
                os.remove(tmp)
            except OSError:
                pass

    def _write_tmp(self) -> str:
        tmp = f"{self.path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(self.me, f)
                f.flush()
                os.fsync(f.fileno())
        except OSError:
            try:
                os.remove(tmp)
            except OSError:
                pass
            raise
        return tmp

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        self._stop.set()
        if self.holder() == self.me:
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
