"""Cases that run only in a process started with TRITON_INTERPRET=1 (``tests/kernels/test_interpreter.py``
starts one per file). ``@triton.jit`` reads TRITON_INTERPRET when it decorates a function, Triton's own
``tl.cumsum`` / ``tl.sum`` included, so the whole process, not one test, has to be interpreted; a pytest
session that also compiles kernels for a GPU never imports Triton that way."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    """Skip these cases (only these: the hook sees the whole session) in a process without the interpreter."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        skip = pytest.mark.skip(reason="needs a process started with TRITON_INTERPRET=1 (tests/kernels/test_interpreter.py)")
        for item in items:
            if Path(item.path).resolve().parent == HERE:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def _bf16_dot(monkeypatch):
    """Triton 3.9's interpreter multiplies the uint16 storage of bf16 operands in ``tl.dot`` (its fp8 branch
    converts, bf16 has none). Convert bf16 operands to fp32 first, exactly (bf16 is the top half of an
    fp32): the GPU accumulates bf16 products in fp32 the same way."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter as interp

    real = interp.InterpreterBuilder.create_dot

    def f32(h):
        if h.dtype == tl.bfloat16:
            return interp.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
        return h

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return real(self, f32(a), f32(b), d, input_precision, max_num_imprecise_acc)

    monkeypatch.setattr(interp.InterpreterBuilder, "create_dot", create_dot)
