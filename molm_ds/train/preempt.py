"""Stopping cleanly: signals and a dead launcher become one request to stop at a step boundary.

Clusters preempt with SIGTERM (Slurm, Kubernetes) or a user signal (Slurm's ``--signal=USR1@90``);
Ctrl-C sends SIGINT to every process of the job. Each rank's handler only records the signal; after
every step the ranks agree (``molm_ds.parallel.comm.any_rank``, a CPU collective that never waits for
the GPU) and then all of them, at the same step, write a complete checkpoint and exit with
``EXIT_PREEMPTED``. A second SIGINT interrupts at once.

A rank also stops when the launcher that started it dies: the ``deepspeed`` launcher does not forward
SIGTERM to its ranks, so a killed launcher would otherwise leave them training as orphans. A watchdog
thread checks the launcher processes above this rank once a second.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Iterable, Optional

from molm_ds.log import get_logger

log = get_logger("train.preempt")

__all__ = ["StopRequests", "EXIT_PREEMPTED", "DEFAULT_SIGNALS"]

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on request after a complete checkpoint; rerun with --resume auto
DEFAULT_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")
_LAUNCHERS = ("deepspeed", "launch.py", "torchrun", "mpirun", "orterun", "prterun", "srun")


def _launcher_ancestors() -> list:
    """The launcher processes above this one (psutil.Process), nearest first, at most three levels."""
    try:
        import psutil
    except ImportError:
        return []
    out, p = [], psutil.Process()
    for _ in range(3):
        p = p.parent()
        if p is None or p.pid <= 1:
            break
        try:
            cmd = " ".join(p.cmdline())
        except (psutil.Error, OSError):
            break
        if any(name in cmd for name in _LAUNCHERS):
            out.append(p)
    return out


class StopRequests:
    """Installs the signal handlers and the launcher watchdog; ``reason`` is set once a stop is asked."""

    def __init__(self, signals: Iterable[str] = DEFAULT_SIGNALS, *, watch_launcher: bool = True) -> None:
        self.reason: Optional[str] = None
        self._previous = {}
        for name in signals:
            sig = getattr(signal, name)
            self._previous[sig] = signal.signal(sig, self._handler)
        self._stop = threading.Event()
        self._ancestors = _launcher_ancestors() if watch_launcher else []
        self._thread = None
        if self._ancestors:
            self._thread = threading.Thread(target=self._watch, name="molm-ds-launcher-watchdog", daemon=True)
            self._thread.start()

    def _handler(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.reason is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        if self.reason is None:
            self.reason = name
            log.warning("%s received: stopping after this step with a checkpoint", name)

    @staticmethod
    def _gone(p) -> bool:
        import psutil

        try:
            return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE  # killed, not yet reaped
        except psutil.Error:
            return True

    def _watch(self) -> None:
        while not self._stop.wait(1.0):
            for p in self._ancestors:
                if self._gone(p):
                    if self.reason is None:
                        self.reason = f"launcher {p.pid} exited"
                        log.warning("the launcher (pid %d) exited: stopping after this step with a checkpoint", p.pid)
                    return

    def close(self) -> None:
        self._stop.set()
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
