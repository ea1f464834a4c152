"""Build a MoLM on its device, in its dtype, initialised once.

    model = build_model(config, device="cuda", dtype=torch.bfloat16)

On a GPU (any device but the CPU) the modules are constructed on the ``meta`` device (shapes only: no
memory, no random draws), materialised on the device (``to_empty``) in the requested dtype, and
initialised once there by ``MoLM.reset_parameters`` (the complete init; the constructors' own inits,
which it overwrites, never run). Nothing passes through host memory, and nothing is drawn twice.

On the CPU the eager constructor runs as before: its modules draw their own initial values, and
``MoLM.__init__`` then draws the final ones, so the weights of a given seed stay those of every earlier
CPU run (the golden loss traces); a CPU model is small. ``meta=True`` takes the single-init path on the
CPU too (tests use it: its weights equal ``MoLM.reset_parameters`` drawn from the same RNG state).
"""

from __future__ import annotations

from typing import Optional

import torch

from molm_ds.config import ModelConfig
from molm_ds.model.transformer import MoLM

__all__ = ["build_model"]


def build_model(config: ModelConfig, *, device="cpu", dtype: torch.dtype = torch.float32,
                meta: Optional[bool] = None) -> MoLM:
    """A MoLM on ``device`` in ``dtype`` (module docstring). ``meta`` defaults to True off the CPU."""
    device = torch.device(device)
    if meta is None:
        meta = device.type != "cpu"
    if not meta:
        return MoLM(config).to(device=device, dtype=dtype)
    with torch.device("meta"):
        model = MoLM(config)
    model.to_empty(device=device)
    model.to(dtype=dtype)  # a cast of uninitialised memory: nothing worth keeping is rounded
    model.reset_parameters()
    return model
