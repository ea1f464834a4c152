"""Paths the user names: directories made if missing, output files and directories checked before any
work (a file where a directory is needed and the reverse, an existing output without ``--overwrite``,
a parent that cannot be written), each refused with a clear error."""

from __future__ import annotations

import os

from molm_ds.errors import UserError

__all__ = ["ensure_writable_dir", "check_output_file", "check_output_dir", "read_utf8", "save_safetensors"]


def ensure_writable_dir(path: str, *, what: str, error: type[UserError]) -> None:
    """Create ``path`` (and parents) unless it exists; raise ``error`` naming ``what`` (the option, e.g.
    ``--out`` or ``run_dir``) when it is a file, cannot be created or is not writable."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise error(f"{what} {path} is a file, not a directory: choose another {what}")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise error(f"{what} {path} cannot be created ({e.strerror or e}): choose a writable {what}") from None
    if not _writable(path):
        raise error(f"{what} {path} is not writable: choose a writable {what}")


def _writable(directory: str) -> bool:
    """os.access, and for root (who passes os.access everywhere) whether the filesystem is read-only."""
    if not os.access(directory, os.W_OK):
        return False
    try:
        return not os.statvfs(directory).f_flag & os.ST_RDONLY
    except OSError:
        return True


def _nearest_existing(path: str) -> str:
    p = os.path.abspath(path)
    while not os.path.exists(p) and os.path.dirname(p) != p:
        p = os.path.dirname(p)
    return p


def check_output_file(path: str, *, what: str, error: type[UserError], overwrite: bool = False,
                      overwrite_flag: str = "--overwrite") -> None:
    """Refuse, before any work, an output file ``path`` that is a directory, that exists (unless
    ``overwrite``), or whose directory cannot be created or written."""
    if os.path.isdir(path):
        raise error(f"{what} {path} is a directory: name a file (e.g. {os.path.join(path, 'out')})")
    if os.path.exists(path) and not overwrite:
        raise error(f"{what} {path} exists: pass {overwrite_flag} to replace it, or choose another file")
    parent = _nearest_existing(os.path.dirname(os.path.abspath(path)))
    if not os.path.isdir(parent):
        raise error(f"{what} {path}: {parent} is a file, not a directory: choose another {what}")
    if not _writable(parent):
        raise error(f"{what} {path}: {parent} is not writable: choose a writable place")


def check_output_dir(path: str, *, what: str, error: type[UserError], overwrite: bool = False,
                     overwrite_flag: str = "--overwrite") -> None:
    """Refuse, before any work, an output directory ``path`` that is a file, that exists and is not
    empty (unless ``overwrite``), or that cannot be created or written."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise error(f"{what} {path} is a file, not a directory: choose a directory")
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise error(f"{what} {path} exists and is not empty: pass {overwrite_flag} to replace it, or choose a "
                    "new directory")
    parent = _nearest_existing(path)
    if not os.path.isdir(parent):
        raise error(f"{what} {path}: {parent} is a file, not a directory: choose another {what}")
    if not _writable(parent):
        raise error(f"{what} {path}: {parent} is not writable: choose a writable place")


def read_utf8(path: str, *, what: str, error: type[UserError]) -> str:
    """The UTF-8 text of ``path``; a missing or unreadable file, or one that is not UTF-8, is one ``error``
    naming the file (and the byte and line where the decoding fails)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise error(f"{what} {path}: {e.strerror or e}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise error(f"{what} {path} is not UTF-8 text (byte {exc.start}, line {line}): save it as UTF-8") from None


def save_safetensors(tensors: dict, path: str, *, metadata: dict | None = None) -> None:
    """``safetensors.torch.save_file``, then the mode ``open()`` gives every other file we write (0666 less
    the umask): safetensors creates its file 0600, which other users (a shared model directory, a
    serving process) cannot read."""
    from safetensors.torch import save_file

    save_file(tensors, path, metadata=metadata)
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)
