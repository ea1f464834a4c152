"""One job per run directory: a lock file that names its holder and proves it alive with a heartbeat.

    <run_dir>/.molm_ds.lock    {"host", "pid", "started", "job"}; its mtime is refreshed every 30 s

A second job on the same run_dir is refused with the holder's name. A lock is stale (taken over, with a
warning) when its holder ran on this host and its pid is gone, or when its heartbeat is older than
``STALE_AFTER_S`` (a holder on another host that crashed). Rank 0 holds it for the whole job.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from typing import Optional

from molm_ds import rundir
from molm_ds.errors import ConfigError
from molm_ds.log import get_logger

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
        try:
            with open(self.path) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError):
            return {}

    def _stale(self, holder: dict) -> Optional[str]:
        """Why the lock is stale, or None when its holder may be alive."""
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
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
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
                log.warning("taking over the stale lock %s of %s (%s)", self.path, holder, why)
                os.replace(self._write_tmp(), self.path)
                if self.holder() == self.me:
                    break
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.me, f)
            break
        else:
            raise ConfigError(f"could not take the lock {self.path}: another job keeps taking it; choose another run_dir")
        self._thread = threading.Thread(target=self._beat, name="molm-ds-run-lock", daemon=True)
        self._thread.start()

    def _write_tmp(self) -> str:
        tmp = f"{self.path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.me, f)
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
