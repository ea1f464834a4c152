"""Triton kernels (tier 1: raw `@triton.jit` kernels + launchers; tier 2: autograd wrappers).

Modules: `kernels.grouped_gemm` (scattered grouped expert GEMM), `kernels.stickbreaking`
(stick-breaking attention forward/backward and one-query decode). This package imports without
Triton and without a GPU; `triton_available()` says whether the kernels can run. On CPU tensors they
only run under the Triton interpreter (`TRITON_INTERPRET=1`, set before Triton is imported).
"""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install without a driver
        return False
    return True
