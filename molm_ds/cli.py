"""What every command-line entry point shares: argument parsing and the user-error convention.

    from molm_ds import cli

    def main(argv=None) -> int:
        args = cli.ArgumentParser(prog="...", description=...).parse_args(argv)
        ...
        return 0

    if __name__ == "__main__":
        cli.run(main)

A ``UserError`` (``molm_ds.errors``) raised anywhere below ``main`` ends the process with one line
``error: <what is wrong and what to change>`` on stderr and exit code 2, without a traceback; so do
argparse's own errors. Under several ranks only rank 0 prints it (every rank runs the same checks on
the same inputs), except a storage error (``molm_ds.storage``: a full disk, an I/O error, a read-only
directory), which only the rank that met it may know of, so that rank prints it. An ``OSError`` that
escaped every guard with such an errno, or ``torch.save``'s wrapped one, ends the same way. ``MOLM_DS_DEBUG=1``
re-raises, for the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, NoReturn, Optional, Sequence

from molm_ds.errors import UserError, debug_enabled, one_line

__all__ = ["ArgumentParser", "run", "fail", "EXIT_USER_ERROR", "SUPPRESS"]

EXIT_USER_ERROR = 2
SUPPRESS = argparse.SUPPRESS


def _rank() -> int:
    from molm_ds.log import rank

    try:
        return rank()
    except Exception:  # torch missing or not importable: a data command on a bare machine
        return 0


def fail(message: str, *, every_rank: bool = False, code: int = EXIT_USER_ERROR, hard: bool = False) -> NoReturn:
    """Print ``error: message`` (rank 0, or this rank too when ``every_rank``: each has its own) and exit with
    ``code`` (2). ``hard``: exit at once, without interpreter teardown (which would wait on a dead peer)."""
    r = _rank()
    if r == 0 or every_rank:
        named = r == 0 or message.startswith(f"rank {r} ")  # a lost-peer line names its rank and host itself
        # one write, newline included: ranks of a host share the launcher's stream, and print()'s separate
        # write of the newline let another rank's line start in the middle of this one
        sys.stderr.write(f"error: {'' if named else f'rank {r}: '}{message}\n")
        sys.stderr.flush()
    if hard:
        import logging

        logging.shutdown()
        _flush_output()
        os._exit(code)
    sys.exit(code)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's error line: ``error: <message> (see --help)``, exit 2, no usage dump."""

    def __init__(self, *args, set_keys: Optional[Callable[[], Sequence[str]]] = None, **kwargs) -> None:
        """``set_keys``: the dotted job fields that ``--set`` changes, so ``--steps 20`` can name
        ``--set training.steps=20`` (called only when a flag is unknown)."""
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)
        self._set_keys = set_keys

    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see {self.prog} --help)")

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        """As argparse, but an unknown flag names the nearest valid one (``--steps``: did you mean ...)."""
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            hints = [h for h in (self._nearest_flag(x) for x in extras) if h]
            self.error(f"unrecognized arguments: {' '.join(extras)}" + (f"; {'; '.join(hints)}" if hints else ""))
        return ns

    def _nearest_flag(self, arg: str) -> str:
        import difflib

        if not arg.startswith("-") or arg == "-":
            return ""
        flag = arg.split("=", 1)[0]
        bare = flag.lstrip("-").replace("-", "_")
        flags = [f for f in self._option_string_actions if f.startswith("--")]
        same = [f for f in flags if f.lstrip("-").replace("-", "_") == bare]  # --max_new_tokens, --max-new-tokens
        if same:
            return f"{flag}: did you mean {same[0]}?"
        keys = list(self._set_keys()) if self._set_keys is not None else []
        field = [k for k in keys if k.rsplit(".", 1)[-1] == bare]  # --steps 20: a job field (--set)
        near = difflib.get_close_matches(flag, flags, n=1, cutoff=0.7)
        field = field or ([] if near else difflib.get_close_matches(bare, keys, n=1, cutoff=0.8))
        if field:
            return f"{flag}: did you mean --set {field[0]}=VALUE?"
        return f"{flag}: did you mean {near[0]}?" if near else ""


def run(main: Callable[[Optional[Sequence[str]]], Optional[int]], argv: Optional[Sequence[str]] = None) -> NoReturn:
    """Call ``main(argv)`` and exit with its return code; a ``UserError`` becomes the one-line error. For a
    command line (``argv`` None) a process group the command started is ended first, and the process ends
    by ``_exit``."""
    from molm_ds.storage import quiet_storage_errors_in_threads

    quiet_storage_errors_in_threads()
    if argv is not None:  # called in-process (tests): a SystemExit for the caller to catch
        sys.exit(_code_of(main, argv))
    try:
        code = _code_of(main, argv)
    except SystemExit as exc:
        if not isinstance(exc.code, (int, type(None))):
            raise  # sys.exit("message"): the interpreter prints it
        code = exc.code or 0
    _exit(code)


def _code_of(main: Callable[[Optional[Sequence[str]]], Optional[int]], argv: Optional[Sequence[str]]) -> int:
    """``main(argv)``'s exit code; the error conventions raise SystemExit through ``fail``."""
    from molm_ds.storage import StorageError, as_storage_error

    try:
        code = main(argv)
    except UserError as exc:
        if debug_enabled():
            raise
        # errors a rank finds on its own (its disk, its network, a lost peer) are printed by every rank that has one
        fail(one_line(exc), every_rank=isinstance(exc, StorageError) or getattr(exc, "every_rank", False),
             code=getattr(exc, "exit_code", EXIT_USER_ERROR), hard=getattr(exc, "hard_exit", False))
    except (OSError, RuntimeError) as exc:
        err = as_storage_error(exc)
        if err is None or debug_enabled():
            raise
        fail(one_line(err), every_rank=True)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
    # A command (argv from the command line) that started a process group ends it before the exit. Not
    # when called in-process with its arguments (tests): DeepSpeed keeps the groups it made for later use.
    if argv is None and "torch.distributed" in sys.modules:
        from molm_ds.parallel import comm

        comm.shutdown()
    return 0 if code is None else int(code)


def _exit(code: int) -> NoReturn:
    """End a command with ``code`` without tearing the interpreter down: the atexit handlers run, MPI is
    finalised if it is initialised (under mpirun), Python's and the C library's output buffers are flushed,
    and then ``os._exit``. The teardown it skips freed every object one by one, and the collector's walk
    over the heap that torch's compiler stack builds cost a rank 1.3 s of CPU at every exit (measured with
    perf; docs/training.md "Tests"). A running non-daemon thread, which the teardown would wait for, or
    ``MOLM_DS_DEBUG=1`` keeps the ordinary exit."""
    import atexit
    import threading

    others = [t for t in threading.enumerate() if t is not threading.main_thread()]
    if debug_enabled() or any(t.is_alive() and not t.daemon for t in others):
        sys.exit(code)
    atexit._run_exitfuncs()
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()  # registered by mpi4py below the atexit level, which os._exit skips
    _flush_output()
    os._exit(code)


def _flush_output() -> None:
    """Before an ``os._exit``: Python's standard streams, then the C library's (fflush(NULL): what C
    extensions printf'd into a pipe, as DeepSpeed's cpu_adam does, is still in its buffer, which only
    exit(3) would write out)."""
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        import ctypes

        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):  # no C library to load by that name: nothing buffered there to lose
        pass
