"""Writing files so that a full disk, an I/O error or a read-only directory is one clear error line.

Every place that writes (checkpoints, the run lock, metrics, TensorBoard, reports, exports, data
preparation) wraps the write in ``guarded_write``: an ``OSError`` whose errno says the storage refused
(ENOSPC, EDQUOT, EIO, EROFS, EACCES, EPERM, EFBIG), or ``torch.save``'s ``RuntimeError`` wrapping one,
becomes a ``StorageError`` (a ``UserError``: the entry point prints ``error: ...`` and exits 2) that
names what was written, where, the errno's meaning, the free space and, when known, how much was
needed. Partial files the caller names are removed first, so what is left is either complete or
absent. Any other exception is a bug and keeps its traceback.

    with guarded_write("metrics row", path):
        with open(path, "a") as f:
            f.write(line)
    atomic_write_text(path, text, what="job.yaml")      # tmp file + rename: never half a file
"""

from __future__ import annotations

import errno
import os
import shutil
from contextlib import contextmanager
from typing import Iterable, Iterator, Optional

from molm_ds.errors import UserError

__all__ = ["StorageError", "as_storage_error", "quiet_storage_errors_in_threads", "guarded_write", "atomic_write_text", "free_bytes", "human_bytes", "STORAGE_ERRNOS",
           "storage_error"]

STORAGE_ERRNOS = frozenset(e for e in (errno.ENOSPC, getattr(errno, "EDQUOT", None), errno.EIO, errno.EROFS,
                                       errno.EACCES, errno.EPERM, errno.EFBIG) if e is not None)


class StorageError(UserError, OSError):
    """The storage refused a write (full, read-only, I/O error, no permission)."""


def human_bytes(n: Optional[int]) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _existing_parent(path: str) -> str:
    p = os.path.abspath(path)
    while not os.path.exists(p) and os.path.dirname(p) != p:
        p = os.path.dirname(p)
    return p


def free_bytes(path: str) -> Optional[int]:
    """Bytes free for this user on the filesystem holding ``path`` (or its nearest existing parent)."""
    try:
        return shutil.disk_usage(_existing_parent(path)).free
    except OSError:
        return None


def _reason(err: Optional[int], path: str) -> str:
    if err in (errno.ENOSPC, getattr(errno, "EDQUOT", -1), errno.EFBIG):
        return "no space left on the device" if err == errno.ENOSPC else os.strerror(err).lower()
    if err == errno.EROFS:
        return "the filesystem is read-only"
    if err in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if err == errno.EIO:
        return "input/output error (a failing disk or a lost network filesystem)"
    return os.strerror(err).lower() if err else "the write failed"


def storage_error(what: str, path: str, err: Optional[int], *, need: Optional[int] = None,
                  after: str = "", verb: str = "write") -> StorageError:
    """The one-line error for a refused write of ``what`` at ``path``; ``after`` says what happens next
    (e.g. which checkpoint stays the resume target)."""
    free = free_bytes(path)
    space = f"{human_bytes(free)} free there" + (f", about {human_bytes(need)} needed" if need else "")
    fix = ("free space or point it at another disk" if err in (errno.ENOSPC, getattr(errno, "EDQUOT", -1), errno.EFBIG)
           else "make the directory writable or choose another one")
    return StorageError(f"cannot {verb} {what + ' ' if what else ''}{path}: {_reason(err, path)} ({space}); {fix}" + (f"; {after}" if after else ""))


def _torch_write_failure(exc: RuntimeError) -> bool:
    """``torch.save`` reports a failed write as a RuntimeError from its zip writer."""
    text = str(exc)
    return any(s in text for s in ("PytorchStreamWriter", "file write failed", "unexpected pos", "inline_container"))


def _guess_errno(path: str) -> int:
    """The errno of a write that failed without one (torch's zip writer): full disk or read-only."""
    parent = _existing_parent(path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path)))
    free = free_bytes(parent)
    if free is not None and free < (4 << 20):
        return errno.ENOSPC
    if not os.access(parent, os.W_OK):
        return errno.EROFS
    try:
        if os.statvfs(parent).f_flag & os.ST_RDONLY:
            return errno.EROFS
    except OSError:
        pass
    return errno.EIO


def remove_quietly(paths: Iterable[str]) -> None:
    for p in paths:
        try:
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p, ignore_errors=True)
            elif os.path.lexists(p):
                os.remove(p)
        except OSError:
            pass  # the storage is failing; what is left is ignored by its reader (tmp names, no marker)


@contextmanager
def guarded_write(what: str, path: str, *, need: Optional[int] = None, cleanup: Iterable[str] = (),
                  after: str = "") -> Iterator[None]:
    """Turn a refused write inside the block into a ``StorageError`` (see the module docstring); the
    ``cleanup`` paths (partial files or directories) are removed first."""
    try:
        yield
    except StorageError:
        remove_quietly(cleanup)
        raise
    except OSError as exc:
        if exc.errno not in STORAGE_ERRNOS:
            raise
        remove_quietly(cleanup)
        raise storage_error(what, getattr(exc, "filename", None) or path, exc.errno, need=need, after=after) from None
    except RuntimeError as exc:
        if not _torch_write_failure(exc):
            raise
        remove_quietly(cleanup)
        raise storage_error(what, path, _guess_errno(path), need=need, after=after) from None


def atomic_write_text(path: str, text: str, *, what: str, after: str = "") -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: readers see the old file or the
    new one, never half of one; a refused write is a ``StorageError`` and leaves no temporary file."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with guarded_write(what, path, need=len(text.encode()), cleanup=[tmp], after=after):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def as_storage_error(exc: BaseException) -> Optional[StorageError]:
    """The StorageError for an exception that no guard caught (an OSError with a storage errno, a library's
    background writer re-raising one, torch.save's wrapped one); None for anything else."""
    if isinstance(exc, StorageError):
        return exc
    if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
        if not exc.filename:  # a write on an open file: the library did not say which
            return StorageError(f"a write failed: {_reason(exc.errno, '')} (the file was not named; see the "
                                "directories this command writes); free space or make them writable")
        writes_only = {errno.ENOSPC, errno.EROFS, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}
        return storage_error("", exc.filename, exc.errno, verb="write to" if exc.errno in writes_only else "use")
    if isinstance(exc, RuntimeError) and _torch_write_failure(exc):
        return storage_error("a file", "(torch.save)", _guess_errno(os.getcwd()))
    return None


def quiet_storage_errors_in_threads() -> None:
    """A background writer thread (TensorBoard's) that dies of a storage error hands it to the main thread,
    which reports it as one line; keep the thread's own traceback off stderr. Other thread errors print."""
    import threading

    previous = threading.excepthook
    if getattr(previous, "_molm_ds_quiet", False):
        return

    def hook(args):
        if args.exc_value is not None and as_storage_error(args.exc_value) is not None:
            return
        previous(args)

    hook._molm_ds_quiet = True
    threading.excepthook = hook
