"""Plain models out of a checkpoint: the full single-process MoLM a tag holds, at whatever ep_size
its files were written."""

from __future__ import annotations

import os

from molm_ds.checkpoint.consolidate import read_fp32_state, read_model_state
from molm_ds.checkpoint.marker import verify
from molm_ds.checkpoint.record import model_config
from molm_ds.checkpoint.resolve import resolve
from molm_ds.errors import CheckpointError

__all__ = ["load_model", "load_fp32_model", "check_same_model"]


def _load(path: str, read, *, expect=None, what: str, check: bool):
    from molm_ds.model import MoLM

    ckpt_dir, tag = resolve(path, what=what)
    if check and (problem := verify(ckpt_dir, tag)) is not None:
        raise CheckpointError(f"{what}: {problem}")
    cfg = model_config(ckpt_dir, tag)
    if expect is not None:
        check_same_model(cfg, expect, where=os.path.join(ckpt_dir, tag), what=what)
    model = MoLM(cfg)
    missing, unexpected = model.load_state_dict(read(ckpt_dir, tag), strict=False)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {os.path.join(ckpt_dir, tag)} does not fit its job's model: missing "
                              f"{missing[:6]}, unexpected {unexpected[:6]}")
    return model


def load_model(path: str, *, expect=None, what: str = "checkpoint", check: bool = True):
    """The plain (full, single-process) MoLM held by a checkpoint directory or tag. ``expect``: the
    ModelConfig the caller believes it holds; a mismatch is a CheckpointError naming the fields.
    ``check``: verify the files against the COMPLETE marker first (a caller that verified already
    passes False)."""
    return _load(path, read_model_state, expect=expect, what=what, check=check)


def load_fp32_model(path: str, *, what: str = "checkpoint", check: bool = True):
    """``load_model`` with the fp32 masters (``read_fp32_state``): the full-precision plain model."""
    return _load(path, read_fp32_state, what=what, check=check)


def check_same_model(have, want, *, where: str, what: str = "init_from") -> None:
    """CheckpointError unless two ModelConfigs are equal, naming the differing fields and the fix."""
    if have == want:
        return
    a, b = have.model_dump(), want.model_dump()
    diff = {k: a[k] for k in a if a[k] != b[k]}
    raise CheckpointError(f"{what} {where} holds a different model than the job's model section: the checkpoint has "
                          f"{diff}, the job {({k: b[k] for k in diff})}; the model section must describe the model in "
                          f"the checkpoint: set model.overrides to include {diff} (or pick the right preset / checkpoint)")
