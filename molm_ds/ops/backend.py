"""Backend switch for the ops: `MOLM_DS_KERNELS` = auto | torch | triton.

auto (default): Triton kernels for CUDA tensors when Triton imports, PyTorch paths otherwise.
torch: always the PyTorch paths (block-wise CPU code / loops), also on CUDA.
triton: always the Triton kernels; an error if Triton is missing. On CPU tensors this only works
under `TRITON_INTERPRET=1` (the interpreter; slow, for tests).
The variable is read at every call, so tests and scripts can flip it with `os.environ`; under
`torch.compile` it is read while tracing, and the choice is part of the graph.
"""

from __future__ import annotations

import os

from torch import Tensor

from molm_ds.kernels import triton_available

__all__ = ["kernels_mode", "triton_available", "use_triton"]

_CHOICES = ("auto", "torch", "triton")


def kernels_mode() -> str:
    mode = os.environ.get("MOLM_DS_KERNELS", "auto").strip().lower() or "auto"
    if mode not in _CHOICES:
        raise ValueError(f"MOLM_DS_KERNELS={mode!r}: use one of {', '.join(_CHOICES)}")
    return mode


def use_triton(t: Tensor) -> bool:
    """Whether the op on tensor `t` should run the Triton kernel."""
    mode = kernels_mode()
    if mode == "torch":
        return False
    if mode == "triton":
        if not triton_available():
            raise RuntimeError("MOLM_DS_KERNELS=triton but Triton is not importable: pip install triton, or set MOLM_DS_KERNELS=auto")
        if not t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("MOLM_DS_KERNELS=triton on CPU tensors needs TRITON_INTERPRET=1 (set before triton is imported)")
        return True
    return t.is_cuda and triton_available()
