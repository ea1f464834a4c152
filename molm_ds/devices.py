"""The device a command runs on: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``, refused when this machine
cannot use it (before any model is loaded)."""

from __future__ import annotations

import os

from molm_ds.errors import ConfigError

__all__ = ["resolve_device"]


def resolve_device(choice: str, *, what: str = "--device"):
    """``torch.device`` for ``choice``: auto = this rank's GPU if there is one, else the CPU. A ConfigError
    for a name that is no device or a GPU this machine does not have."""
    import torch

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if choice == "auto":
        return torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(choice)
    except RuntimeError:
        raise ConfigError(f"{what} {choice!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise ConfigError(f"{what} {choice!r}: this command runs on cpu or cuda; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ConfigError(f"{what} {choice}: CUDA is not available on this machine (torch {torch.__version__}, "
                          f"{torch.cuda.device_count()} GPU(s) visible): use --device cpu or auto")
    index = local if dev.index is None else dev.index
    if index >= torch.cuda.device_count():
        raise ConfigError(f"{what} {choice}: this machine has {torch.cuda.device_count()} GPU(s) "
                          f"(cuda:0..cuda:{torch.cuda.device_count() - 1}): choose one of them")
    return torch.device("cuda", index)
