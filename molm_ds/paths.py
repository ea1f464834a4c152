"""Directories the user names: made if missing, refused with a clear error if they cannot be used."""

from __future__ import annotations

import os

from molm_ds.errors import UserError

__all__ = ["ensure_writable_dir", "save_safetensors"]


def ensure_writable_dir(path: str, *, what: str, error: type[UserError]) -> None:
    """Create ``path`` (and parents) unless it exists; raise ``error`` naming ``what`` (the option, e.g.
    ``--out`` or ``run_dir``) when it is a file, cannot be created or is not writable."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise error(f"{what} {path} is a file, not a directory: choose another {what}")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise error(f"{what} {path} cannot be created ({e.strerror or e}): choose a writable {what}") from None
    if not os.access(path, os.W_OK):
        raise error(f"{what} {path} is not writable: choose a writable {what}")


def save_safetensors(tensors: dict, path: str, *, metadata: dict | None = None) -> None:
    """``safetensors.torch.save_file``, then the mode ``open()`` gives every other file we write (0666 less
    the umask): safetensors creates its file 0600, which other users (a shared model directory, a
    serving process) cannot read."""
    from safetensors.torch import save_file

    save_file(tensors, path, metadata=metadata)
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)
