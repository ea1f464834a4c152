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
import inspect
import os

__all__ = ["triton_available"]


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether Triton imports here (it may be absent, or installed without a usable driver)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        _mend_interpreter_index()
    return True


def _mend_interpreter_index() -> None:
    """Triton 3.6's interpreter holds a scalar argument as a one-element array and turns it into a Python
    int with ``int(array)``, which NumPy >= 2.4 refuses: every ``range(0, I, BLOCK)`` over a scalar
    argument then fails. Later interpreters squeeze the array first; do the same for the old one. Only
    the interpreter (CPU tests, ``gpu_check.sh --cpu-smoke``) is touched, never compiled kernels."""
    try:
        from triton.runtime import interpreter
    except Exception:
        return
    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or getattr(patch, "_molm_ds_mended", False):
        return
    try:
        needs = "int(self.handle.data)" in inspect.getsource(patch)
    except (OSError, TypeError):
        return
    if not needs:
        return

    def mended(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    mended._molm_ds_mended = True
    interpreter._patch_lang_tensor = mended
