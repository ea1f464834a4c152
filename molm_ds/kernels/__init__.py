"""Tier 1 of the kernels: raw ``@triton.jit`` kernels and their launchers, one sub-package per op.

    molm_ds/kernels/grouped_gemm/   scattered grouped expert GEMM (gather / scatter / row scale fused)
    molm_ds/kernels/stickbreaking/  stick-breaking attention: forward, two-pass backward, decode

Nothing here is autograd-aware: tier 2, the ``torch.library.custom_op`` wrappers with their autograd
formulas and fake (meta) implementations, lives in ``molm_ds.ops``, beside the backend switch and the
readable references; tier 3 is the model's ``nn.Module`` s. This package imports without Triton and
without a GPU: only ``<op>.launch`` imports Triton, and ``molm_ds.ops`` imports it only when a Triton
path is chosen. On CPU tensors the kernels run under the Triton interpreter, in a process started
with ``TRITON_INTERPRET=1`` (``@triton.jit`` reads it when it decorates; ``tests/kernels/test_interpreter.py``).
"""

from __future__ import annotations

import functools

__all__ = ["triton_available"]


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether Triton imports here (it may be absent, or installed without a usable driver)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install
        return False
    return True
