"""Who stopped answering: the lost-peer line, and the stall watchdog.

A job whose peer dies (a killed process, a host gone, a cut cable) must not hang and must not end in a
backend traceback. Every collective gives up after the job's collective timeout
(``molm_ds.train.distributed``); then :meth:`PeerWatch.explain` turns the failure into one line on
every surviving rank::

    error: rank 0 on node1: lost peer: rank 2, 3 on host node2 (10.0.0.2) stopped answering at step 4 (collective
    timeout 20 s); last complete checkpoint: runs/x/checkpoints/step_00000004; continue with --resume auto (any world size)

Which ranks are gone is measured, not guessed from the backend's message: at start-up every rank opens a
small TCP listener (a thread that accepts and closes) and all ranks exchange (rank, host, address,
port); after a failed collective each survivor knocks on every peer's listener (in parallel, 2 s each,
twice, 1 s apart: the processes of a lost host do not all die at the same instant; the second knock
only adds ranks on hosts the first found gone, since a survivor that noticed earlier may have exited) and
names the ranks that do not answer. It then shuts down its own collectives' connections, so a survivor
waiting in a collective on this rank (not on the lost one) fails now, while this rank still answers, rather
than at this process's exit, when it would knock too late and name this rank lost; and it keeps its own
listener open a few seconds more, so a survivor that fails a little later still sees it alive.

A rank that makes no progress at all (stuck outside a collective, or in a backend that never times out)
is ended by :meth:`PeerWatch.beat`'s watchdog: ``faulthandler`` dumps every thread's Python stack to
stderr and exits, ``stall_s`` after the last beat.
"""

from __future__ import annotations

import faulthandler
import os
import re
import socket
import stat
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

from molm_ds.errors import UserError
from molm_ds.log import get_logger
from molm_ds.parallel import comm

log = get_logger("parallel.peers")

__all__ = ["PeerLostError", "PeerWatch", "Peer", "EXIT_PEER_LOST", "is_collective_failure", "stall_seconds"]

EXIT_PEER_LOST = 69  # EX_UNAVAILABLE: not the user's mistake; resume once the hosts are back (or fewer)
KNOCK_S = 2.0  # how long a survivor waits for a peer's listener
LINGER_S = 4.0  # how long a survivor keeps answering after it found the loss (longer than its own knocking)


class PeerLostError(UserError, RuntimeError):
    """A peer stopped answering; the message is the lost-peer line. Printed by every rank that raises
    it, and the process exits at once (no teardown: it would wait on the dead peer)."""

    every_rank = True
    exit_code = EXIT_PEER_LOST
    hard_exit = True


@dataclass(frozen=True)
class Peer:
    rank: int
    host: str
    addr: str
    port: int


_FAILURE_WORDS = re.compile(r"gloo|nccl|connection (reset|closed|refused)|timed out|timeout|broken pipe|"
                            r"socket|peer|connectfullmesh|no route to host|network is unreachable", re.I)


def is_collective_failure(exc: BaseException) -> bool:
    """An exception raised by a failed collective (backend error, peer gone, timeout)."""
    import torch.distributed as dist

    if isinstance(exc, UserError):
        return False
    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(exc, dist_error):
        return True
    return isinstance(exc, (RuntimeError, ConnectionError, TimeoutError)) and bool(_FAILURE_WORDS.search(str(exc)))


def stall_seconds(timeout_s: float) -> float:
    """How long a rank may go without progress before the watchdog ends it: long enough that the
    collective timeout fires first and explains itself."""
    return 2 * timeout_s + 60


class PeerWatch:
    """Start with :meth:`start` after the process group exists (collective); :meth:`beat` at every step."""

    def __init__(self, timeout_s: float, stall_s: Optional[float] = None):
        self.timeout_s = float(timeout_s)
        self.stall_s = stall_seconds(self.timeout_s) if stall_s is None else float(stall_s)
        self.step = 0
        self.peers: list[Peer] = []
        self._sock: Optional[socket.socket] = None
        self._stop = threading.Event()

    # life cycle
    def start(self) -> "PeerWatch":
        if comm.world_size() > 1:
            self._listen()
            addr = _own_address()
            me = (comm.rank(), socket.gethostname(), addr, self._sock.getsockname()[1])
            self.peers = [Peer(*p) for p in comm.all_gather_object(me)]
        return self

    def _listen(self) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("0.0.0.0", 0))
        s.listen(64)
        s.settimeout(0.5)
        self._sock = s

        def serve():
            while not self._stop.is_set():
                try:
                    c, _ = s.accept()
                    c.close()
                except socket.timeout:
                    continue
                except OSError:
                    return

        threading.Thread(target=serve, name="molm-ds-peer-listener", daemon=True).start()

    def beat(self, step: int) -> None:
        """Progress: re-arm the stall watchdog and remember the step for the lost-peer line."""
        self.step = step
        faulthandler.dump_traceback_later(self.stall_s, exit=True, file=sys.stderr)

    def close(self) -> None:
        faulthandler.cancel_dump_traceback_later()
        self._stop.set()
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    # after a failure
    def unreachable(self) -> list[Peer]:
        """The peers whose listener does not answer within ``KNOCK_S``."""
        me = comm.rank() if comm.initialized() else -1

        def dead(p: Peer) -> bool:
            try:
                with socket.create_connection((p.addr, p.port), timeout=KNOCK_S):
                    return False
            except OSError:
                return True

        others = [p for p in self.peers if p.rank != me]
        if not others:
            return []
        with ThreadPoolExecutor(max_workers=min(32, len(others))) as pool:
            return [p for p, d in zip(others, pool.map(dead, others)) if d]

    def explain(self, exc: BaseException, *, last_checkpoint: Optional[str]) -> Optional[PeerLostError]:
        """The lost-peer error for ``exc`` (None when it is not a collective's failure)."""
        if not self.peers or not is_collective_failure(exc):
            return None
        faulthandler.cancel_dump_traceback_later()
        t0 = time.monotonic()
        first = self.unreachable()
        time.sleep(KNOCK_S / 2)  # peers of a lost host die one by one: knock again before naming them
        second = self.unreachable()
        # the second knock only adds ranks on the hosts the first found gone: another survivor may have
        # found the loss earlier and exited in between, and it is no lost peer
        hosts = {p.host for p in first}
        lost = {p.rank: p for p in first + [q for q in second if q.host in hosts or not first]}
        lost = [lost[r] for r in sorted(lost)]
        if lost:
            by_host: dict[tuple[str, str], list[int]] = {}
            for p in lost:
                by_host.setdefault((p.host, p.addr), []).append(p.rank)
            who = "; ".join(f"rank {', '.join(map(str, r))} on host {h} ({a})" for (h, a), r in by_host.items())
            what = f"lost peer: {who} stopped answering"
        else:
            cause = " ".join(str(exc).split())[:200]
            what = f"a collective failed though every rank still answers (a rank is stuck; its stacks follow its own " \
                   f"stall watchdog): {cause}"
        where = f"last complete checkpoint: {last_checkpoint}; continue with --resume auto (any world size)" \
            if last_checkpoint else "no complete checkpoint yet: start again (--overwrite)"
        log.debug("collective failure: %s", exc)
        _release_peers(keep=self._sock)
        time.sleep(max(0.0, LINGER_S - (time.monotonic() - t0)))  # let later survivors see this one alive
        me = f"rank {comm.rank()} on {socket.gethostname()}"
        return PeerLostError(f"{me}: {what} at step {self.step} (collective timeout {self.timeout_s:g} s); {where}")


def _release_peers(keep: Optional[socket.socket]) -> int:
    """Shut down this process's connected TCP sockets (its collectives' connections) except ``keep``, the
    listener. A survivor that waits in a collective on this rank, not on the lost one, then fails now and
    finds this rank still answering; otherwise it would fail only when this process exits, knock too late
    and name this survivor a lost peer. Returns how many were shut down."""
    keep_fd = keep.fileno() if keep is not None else -1
    try:
        fds = [int(f) for f in os.listdir("/proc/self/fd")]
    except OSError:  # no /proc: peers find out when this process exits
        return 0
    done = 0
    for fd in fds:
        if fd == keep_fd:
            continue
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            s = socket.socket(fileno=fd)
        except OSError:
            continue
        try:
            if s.family in (socket.AF_INET, socket.AF_INET6) and s.type == socket.SOCK_STREAM:
                s.getpeername()  # connected (a listening socket raises)
                s.shutdown(socket.SHUT_RDWR)
                done += 1
        except OSError:
            pass
        finally:
            s.detach()  # the fd stays its owner's
    return done


def _own_address() -> str:
    """The address peers reach this rank at: that of GLOO_SOCKET_IFNAME (set at start-up)."""
    from molm_ds.parallel.network import interfaces

    name = os.environ.get("GLOO_SOCKET_IFNAME")
    addr = interfaces().get(name or "", "")
    return addr or "127.0.0.1"
